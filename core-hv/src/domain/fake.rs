//! Host fakes of the arch layer's memory traits, for tests: a frame pool that counts what is
//! outstanding, byte-array frames, and an address space that charges one table frame per
//! 2 MiB region it maps into (plus its root), like a 4-level page table does at the leaves.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::cell::RefCell;
use core::sync::atomic::{AtomicU64, Ordering};

use super::memory::{
    AddressSpace, AddressSpaceFactory, AtomicFrame, FrameSource, MapError, Mfn, PagePerms, PhysMem,
};
use shared_abi::start_info::DOMAIN_VA_END;

/// A pool of `n` frames numbered from 0x1000.
pub struct FakeFrames {
    free: Vec<Mfn>,
    outstanding: BTreeSet<Mfn>,
}

impl FakeFrames {
    pub fn new(n: u64) -> Self {
        FakeFrames {
            free: (0..n).rev().map(|i| Mfn(0x1000 + i)).collect(),
            outstanding: BTreeSet::new(),
        }
    }
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }
}

impl FrameSource for FakeFrames {
    fn alloc_frame(&mut self) -> Option<Mfn> {
        let f = self.free.pop()?;
        self.outstanding.insert(f);
        Some(f)
    }
    fn free_frame(&mut self, frame: Mfn) {
        assert!(self.outstanding.remove(&frame), "double free of {frame:?}");
        self.free.push(frame);
    }
    fn free_frames(&self) -> Option<u64> {
        Some(self.free.len() as u64)
    }
}

/// Frames as atomic words (so the atomic view and byte access agree), created zeroed on
/// first touch. Pages are leaked: the atomic views are `'static`, and this is test code.
#[derive(Default)]
pub struct FakePhys {
    pages: RefCell<BTreeMap<Mfn, &'static AtomicFrame>>,
}

impl FakePhys {
    fn page(&self, frame: Mfn) -> &'static AtomicFrame {
        self.pages
            .borrow_mut()
            .entry(frame)
            .or_insert_with(|| Box::leak(Box::new(core::array::from_fn(|_| AtomicU64::new(0)))))
    }
}

impl PhysMem for FakePhys {
    fn read(&self, frame: Mfn, offset: usize, buf: &mut [u8]) {
        let p = self.page(frame);
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i;
            *b = (p[at / 8].load(Ordering::SeqCst) >> (8 * (at % 8))) as u8;
        }
    }
    fn write(&self, frame: Mfn, offset: usize, data: &[u8]) {
        let p = self.page(frame);
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i;
            let shift = 8 * (at % 8);
            p[at / 8].fetch_and(!(0xFFu64 << shift), Ordering::SeqCst);
            p[at / 8].fetch_or(u64::from(b) << shift, Ordering::SeqCst);
        }
    }
    fn atomic_frame(&self, frame: Mfn) -> Option<&'static AtomicFrame> {
        Some(self.page(frame))
    }
}

/// An address space as a map; table frames charged per 2 MiB region touched.
#[derive(Default)]
pub struct FakeAddressSpace {
    map: BTreeMap<u64, (Mfn, PagePerms)>,
    tables: BTreeMap<u64, Mfn>,
    root: Option<Mfn>,
}

impl FakeAddressSpace {
    pub fn new() -> Self {
        FakeAddressSpace {
            map: BTreeMap::new(),
            tables: BTreeMap::new(),
            root: None,
        }
    }
    pub fn mapped(&self) -> usize {
        self.map.len()
    }
    pub fn mappings(&self) -> impl Iterator<Item = (u64, Mfn, PagePerms)> + '_ {
        self.map.iter().map(|(&va, &(f, p))| (va, f, p))
    }
}

impl AddressSpace for FakeAddressSpace {
    fn map(
        &mut self,
        va: u64,
        frame: Mfn,
        perms: PagePerms,
        tables: &mut dyn FrameSource,
    ) -> Result<(), MapError> {
        if !va.is_multiple_of(4096) || va >= DOMAIN_VA_END {
            return Err(MapError::BadAddress);
        }
        if self.map.contains_key(&va) {
            return Err(MapError::AlreadyMapped);
        }
        let region = va >> 21;
        if let alloc::collections::btree_map::Entry::Vacant(e) = self.tables.entry(region) {
            e.insert(tables.alloc_frame().ok_or(MapError::OutOfFrames)?);
        }
        self.map.insert(va, (frame, perms));
        Ok(())
    }
    fn unmap(&mut self, va: u64) -> Option<Mfn> {
        self.map.remove(&(va & !0xfff)).map(|(f, _)| f)
    }
    fn translate(&self, va: u64) -> Option<(Mfn, PagePerms)> {
        self.map.get(&(va & !0xfff)).copied()
    }
    fn root(&self) -> Mfn {
        self.root.unwrap_or(Mfn(0))
    }
    fn release(&mut self, tables: &mut dyn FrameSource) {
        for (_, t) in core::mem::take(&mut self.tables) {
            tables.free_frame(t);
        }
        if let Some(r) = self.root.take() {
            tables.free_frame(r);
        }
    }
}

/// Makes [`FakeAddressSpace`]s, charging the root frame.
pub struct FakeMmu;

impl AddressSpaceFactory for FakeMmu {
    fn create(&mut self, tables: &mut dyn FrameSource) -> Result<Box<dyn AddressSpace>, MapError> {
        let root = tables.alloc_frame().ok_or(MapError::OutOfFrames)?;
        let mut a = FakeAddressSpace::new();
        a.root = Some(root);
        Ok(Box::new(a))
    }
}

/// A settable clock (1 GHz TSC, so ticks = ns).
#[derive(Default)]
pub struct FakeClock {
    pub now: core::cell::Cell<u64>,
}

impl super::hypervisor::Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.now.get()
    }
    fn tsc(&self) -> u64 {
        self.now.get()
    }
    fn tsc_hz(&self) -> u64 {
        1_000_000_000
    }
}

/// Console output collected as bytes.
#[derive(Default)]
pub struct Lines(pub Vec<u8>);

impl super::console::ConsoleSink for Lines {
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    /// Everything written, as an unbounded history.
    fn read_log(
        &mut self,
        from: u64,
        out: &mut [u8],
    ) -> Result<super::console::RingRead, shared_abi::errno::XenError> {
        let from_ix = usize::try_from(from)
            .ok()
            .filter(|&f| f <= self.0.len())
            .ok_or(shared_abi::errno::XenError::EINVAL)?;
        let n = out.len().min(self.0.len() - from_ix);
        out[..n].copy_from_slice(&self.0[from_ix..from_ix + n]);
        Ok(super::console::RingRead {
            copied: n,
            next: from + n as u64,
            lost: 0,
        })
    }
}

impl Lines {
    pub fn text(&self) -> alloc::string::String {
        alloc::string::String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// A management line: bytes the host sent (`rx`), bytes the hypervisor sent (`tx`).
#[derive(Default)]
pub struct FakeLine {
    pub present: bool,
    pub rx: alloc::collections::VecDeque<u8>,
    pub tx: Vec<u8>,
}

impl super::console::MgmtLine for FakeLine {
    fn present(&self) -> bool {
        self.present
    }
    fn read(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.rx.len());
        for (d, s) in buf.iter_mut().zip(self.rx.drain(..n)) {
            *d = s;
        }
        n
    }
    fn write(&mut self, data: &[u8]) -> usize {
        self.tx.extend_from_slice(data);
        data.len()
    }
}

/// Everything a [`super::Platform`] borrows, owned.
pub struct Env {
    pub frames: FakeFrames,
    pub phys: FakePhys,
    pub mmu: FakeMmu,
    pub clock: FakeClock,
    pub console: Lines,
    pub mgmt: FakeLine,
}

impl Env {
    pub fn new(frames: u64) -> Self {
        Env {
            frames: FakeFrames::new(frames),
            phys: FakePhys::default(),
            mmu: FakeMmu,
            clock: FakeClock::default(),
            console: Lines::default(),
            mgmt: FakeLine::default(),
        }
    }

    pub fn platform(&mut self) -> super::Platform<'_> {
        super::Platform {
            frames: &mut self.frames,
            phys: &self.phys,
            mmu: &mut self.mmu,
            clock: &self.clock,
            console: &mut self.console,
            mgmt: &mut self.mgmt,
        }
    }

    /// Read `len` bytes of a frame.
    pub fn frame_bytes(&self, f: Mfn, off: usize, len: usize) -> Vec<u8> {
        let mut b = alloc::vec![0u8; len];
        self.phys.read(f, off, &mut b);
        b
    }
}

impl FakePhys {
    /// Test helper: write bytes into a frame.
    pub fn write_bytes(&self, frame: Mfn, offset: usize, data: &[u8]) {
        self.write(frame, offset, data);
    }
}

/// A one-vCPU domain config for hypercall tests: `name`, `memory_kib`, `caps`, defaults
/// otherwise (as a manifest entry with no devices would give).
pub fn test_config(
    name: &str,
    memory_kib: u64,
    caps: shared_abi::capability::Capabilities,
) -> super::builder::DomainConfig {
    use shared_abi::domain_config::LifecycleAction;
    super::builder::DomainConfig::from_spec(&shared_abi::manifest::DomainSpec {
        name: name.into(),
        elf: shared_abi::manifest::Blob { offset: 0, len: 0 },
        memory_kib,
        vcpus: 1,
        weight: 256,
        cap_percent: 0,
        capabilities: caps,
        cmdline: alloc::string::String::new(),
        devices: Vec::new(),
        on_poweroff: LifecycleAction::Destroy,
        on_reboot: LifecycleAction::Destroy,
        on_crash: LifecycleAction::Destroy,
    })
}

/// Issue `domctl` `cmd` (header target `target`, then `payload`) as domain `dom` on `cpu`,
/// the buffer at `arg` in its memory: the return value and the buffer as the hypervisor left
/// it (header and payload out-fields).
#[allow(clippy::too_many_arguments)]
pub fn domctl(
    env: &mut Env,
    hv: &mut super::hypervisor::Hypervisor,
    dom: shared_abi::DomId,
    cpu: usize,
    arg: u64,
    cmd: u32,
    target: shared_abi::DomId,
    payload: &[u8],
) -> (i64, [u8; shared_abi::hypercall_args::domctl::DOMCTL_LEN]) {
    use shared_abi::hypercall_args::Wire;
    use shared_abi::hypercall_args::domctl::{self as dc, DomctlHeader};
    let mut b = [0u8; dc::DOMCTL_LEN];
    DomctlHeader {
        cmd,
        interface_version: dc::INTERFACE_VERSION,
        domain: target,
        pad: [0; 3],
    }
    .encode(&mut b);
    b[16..16 + payload.len()].copy_from_slice(payload);
    let copy_in = |env: &Env, hv: &super::hypervisor::Hypervisor| {
        let a = hv.domains.get(dom).and_then(|d| d.aspace.as_deref());
        let a = a.expect("the caller has an address space");
        super::guest_memory::GuestMemory::new(a, &env.phys)
            .copy_to_guest(arg, &b)
            .expect("domctl buffer in the caller's memory");
    };
    copy_in(env, hv);
    let r = hv
        .hypercall(
            &mut env.platform(),
            cpu,
            shared_abi::hypercall::DOMCTL,
            [arg, 0, 0, 0, 0],
        )
        .ret;
    let mut out = [0u8; dc::DOMCTL_LEN];
    let a = hv.domains.get(dom).and_then(|d| d.aspace.as_deref());
    if let Some(a) = a {
        super::guest_memory::GuestMemory::new(a, &env.phys)
            .copy_from_guest(arg, &mut out)
            .expect("domctl buffer readable");
    }
    (r, out)
}

/// Domain `dom`, running on `cpu`, binds `virq` on vCPU 0 through the event-channel
/// hypercall (argument at `arg` in its memory): the port it got.
pub fn bind_virq(
    env: &mut Env,
    hv: &mut super::hypervisor::Hypervisor,
    dom: shared_abi::DomId,
    cpu: usize,
    arg: u64,
    virq: u32,
) -> u32 {
    use shared_abi::event_channel::{EvtchnBindVirq, op};
    let b = EvtchnBindVirq {
        virq,
        vcpu: 0,
        port: 0,
    }
    .to_bytes();
    super::guest_memory::GuestMemory::new(address_space(hv, dom), &env.phys)
        .copy_to_guest(arg, &b)
        .expect("bind_virq argument in the caller's memory");
    let r = hv
        .hypercall(
            &mut env.platform(),
            cpu,
            shared_abi::hypercall::EVENT_CHANNEL_OP,
            [u64::from(op::BIND_VIRQ), arg, 0, 0, 0],
        )
        .ret;
    assert_eq!(r, 0, "bind_virq({virq}) refused");
    let mut out = alloc::vec![0u8; b.len()];
    super::guest_memory::GuestMemory::new(address_space(hv, dom), &env.phys)
        .copy_from_guest(arg, &mut out)
        .expect("bind_virq argument readable");
    EvtchnBindVirq::from_bytes(&out)
        .expect("a whole EvtchnBindVirq")
        .port
}

fn address_space(hv: &super::hypervisor::Hypervisor, dom: shared_abi::DomId) -> &dyn AddressSpace {
    let a = hv.domains.get(dom).and_then(|d| d.aspace.as_deref());
    a.expect("the domain has an address space")
}

/// Where `port`'s bit lies in `dom`'s shared-info page: the frame and the byte offset of
/// its 64-bit `evtchn_pending` word.
fn pending_word(
    hv: &super::hypervisor::Hypervisor,
    dom: shared_abi::DomId,
    port: u32,
) -> (Mfn, usize) {
    let si = hv.domains.get(dom).expect("a live domain").shared_info;
    let words = core::mem::offset_of!(shared_abi::shared_info::SharedInfo, evtchn_pending);
    (si, words + (port as usize / 64) * 8)
}

/// Is `port` pending in `dom`'s shared info?
pub fn event_pending(
    env: &Env,
    hv: &super::hypervisor::Hypervisor,
    dom: shared_abi::DomId,
    port: u32,
) -> bool {
    let (si, at) = pending_word(hv, dom, port);
    let mut w = [0u8; 8];
    env.phys.read(si, at, &mut w);
    u64::from_le_bytes(w) & (1 << (port % 64)) != 0
}

/// Clear the pending word holding `port` in `dom`'s shared info (as the guest would).
pub fn clear_pending(
    env: &Env,
    hv: &super::hypervisor::Hypervisor,
    dom: shared_abi::DomId,
    port: u32,
) {
    let (si, at) = pending_word(hv, dom, port);
    env.phys.write(si, at, &[0u8; 8]);
}
