//! `blkback-domain`: the block backend driver domain (a Bulkhead PV domain on dom-rt) running
//! the [`blkback_dom`] engine.
//!
//! It serves every vbd the toolstack puts under its backend directory
//! (`/local/domain/<me>/backend/vbd/<frontend-id>/<devid>`, XEN-ABI.md §5.2), each from its
//! own RAM disk of `ramdisk_mib=<n>` MiB (default 8). The loop:
//!
//! 1. on a xenstore watch event (its backend directory, a frontend's `state`), or every
//!    second as a backstop: probe new devices once their frontend directory exists
//!    (InitWait with the features offered), and hand every frontend state change to the
//!    xenbus logic ([`blkback_dom::xenbus::BlkbackXenbus`]);
//! 2. on connect: map the frontend's ring pages (grant_map capability) contiguously, bind
//!    its event channels, build the engine over the RAM disk, go Connected; on close:
//!    unmap everything, unbind, go Closed;
//! 3. serve every connected device's rings and completions; block in `SCHEDOP_poll` on every
//!    port (xenstore's too) with a short timeout.
//!
//! Command line: `ramdisk_mib=<n>`; `disk=virtio`: the first device is served from the
//! assigned virtio-blk function instead (device_owner capability, dom-rt's device layer),
//! the whole disk or, with `part=<frontend>:<start>+<sectors>[:ro][,...]`, one window
//! (partition) of it per listed frontend — windows may not overlap — while unlisted
//! frontends get RAM disks;
//! the others from RAM disks; `serve=<frontend-id>:<devid>[,...]` makes the domain write
//! the backend directory of those devices itself (for systems without a toolstack writing
//! device entries; the frontend then writes its own directory); `exit_when_idle` powers off
//! once at least one device was probed and every device is closed again or gone (test
//! systems that must end). A frontend that corrupts its ring is disconnected (the engine's
//! `RingCorrupted`); other devices go on.
//!
//! Every grant mapping counts against this domain's maptrack quota (`maptrack=`, default
//! the hypervisor's 1024): half of it is the persistent-grant budget, divided evenly among
//! the connected queues and re-divided at every connect and disconnect; a request that finds
//! the quota used up waits for completions instead of failing (see the engine).
//!
//! On the host this binary is a stub.
#![cfg_attr(all(target_arch = "x86_64", target_os = "none"), no_std, no_main)]

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
dom_rt::entry!(domain::main);

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
extern crate alloc;

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
mod domain {
    use alloc::boxed::Box;
    use alloc::collections::BTreeMap;
    use alloc::format;
    use alloc::rc::Rc;
    use alloc::string::{String, ToString};
    use alloc::vec::Vec;
    use core::cell::{Cell, RefCell};

    use blkback_dom::device::{
        BlockDevice, DeviceError, DeviceInfo, Partition, RamDisk, SyncIo, check_range,
    };
    use blkback_dom::engine::{Notify, Vbd, persistent_budget, persistent_share};
    use blkback_dom::grant::{GrantMapper, MapRequest, Mapping};
    use blkback_dom::xenbus::{Action, BackendOffer, BlkbackXenbus, Connection};
    use dom_rt::blkfront::domain::XenbusStore;
    use dom_rt::device::virtio::{DomHal, VirtioPci, VirtioTransport};
    use dom_rt::gnttab::{self, MapWindow};
    use dom_rt::xenbus::{ClientRing, EvtchnSignal, RingTransport, Tx, WatchHandle, Xenbus};
    use dom_rt::{StartInfo, XenError, evtchn, hypercall, println, time};
    use shared_abi::DomId;
    use shared_abi::PAGE_SIZE;
    use shared_abi::event_channel::EvtchnPort;
    use shared_abi::grant_table::{GntStatus, GrantHandle};
    use shared_abi::ring::SharedRingMem;
    use shared_abi::start_info::{GRANT_MAP_END, XENSTORE_RING_VA};
    use shared_abi::xenbus::{BackendDir, XenbusError, XenbusState, backend_ready_to_probe, path};
    use virtio_drivers::device::blk::VirtIOBlk;

    type Bus = Xenbus<RingTransport<SharedRingMem, EvtchnSignal>>;
    type Io = SyncIo<Disk>;

    /// The assigned virtio-blk function (`disk=virtio`), driven synchronously: each
    /// operation is one virtio request on the domain's own (DMA-reachable) heap buffers,
    /// polled to completion.
    struct VirtioDisk {
        blk: VirtIOBlk<DomHal, VirtioTransport>,
        _pci: VirtioPci,
    }

    impl VirtioDisk {
        fn open() -> Result<Self, String> {
            let dev = dom_rt::device::find(0x1af4, &[0x1001, 0x1042])
                .ok_or("no virtio-blk function assigned")?;
            let pci = VirtioPci::open(dev).map_err(|e| format!("virtio-pci setup: {e}"))?;
            let t = pci.transport().map_err(|e| format!("transport: {e}"))?;
            let blk = VirtIOBlk::new(t).map_err(|e| format!("virtio-blk init: {e:?}"))?;
            Ok(VirtioDisk { blk, _pci: pci })
        }

        fn check(&self, offset: u64, len: usize) -> Result<usize, DeviceError> {
            check_range(offset, len as u64, self.blk.capacity().saturating_mul(512))?;
            if len == 0 || !len.is_multiple_of(512) || !offset.is_multiple_of(512) {
                return Err(DeviceError::OutOfRange {
                    offset,
                    len: len as u64,
                });
            }
            usize::try_from(offset / 512).map_err(|_| DeviceError::OutOfRange {
                offset,
                len: len as u64,
            })
        }
    }

    fn verr(e: virtio_drivers::Error) -> DeviceError {
        println!("blkback: virtio-blk: {e:?}");
        DeviceError::Io { errno: 5 }
    }

    /// A RAM disk, the virtio-blk disk (shared by the devices served from its partitions;
    /// one request at a time, so a `RefCell` borrow never overlaps), or a partition of it.
    enum Disk {
        Ram(RamDisk),
        Virtio(Rc<RefCell<VirtioDisk>>),
        Part(Box<Partition<Disk>>),
    }

    /// `part=<frontend>:<start>+<sectors>[:ro]`: the window of the virtio-blk disk that
    /// frontend domain's disk is.
    #[derive(Clone, Copy, Debug)]
    struct PartSpec {
        frontend: DomId,
        start: u64,
        sectors: u64,
        read_only: bool,
    }

    /// Parse `part=` (comma-separated specs); windows must not overlap and each frontend has
    /// at most one.
    fn parse_parts(v: &str) -> Result<Vec<PartSpec>, String> {
        let mut out: Vec<PartSpec> = Vec::new();
        for item in v.split(',') {
            let mut f = item.split(':');
            let fe = f.next().and_then(|x| x.parse::<DomId>().ok());
            let range = f.next().and_then(|r| {
                let (a, b) = r.split_once('+')?;
                Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
            });
            let ro = match f.next() {
                None => Some(false),
                Some("ro") => Some(true),
                Some("rw") => Some(false),
                Some(_) => None,
            };
            let (Some(frontend), Some((start, sectors)), Some(read_only), None) =
                (fe, range, ro, f.next())
            else {
                return Err(format!(
                    "part entry {item:?}: want <frontend domid>:<start sector>+<sectors>[:ro|:rw]"
                ));
            };
            let end = start
                .checked_add(sectors)
                .filter(|_| sectors > 0)
                .ok_or_else(|| format!("part entry {item:?}: empty or overflowing window"))?;
            for o in &out {
                if o.frontend == frontend {
                    return Err(format!("part: frontend {frontend} has two windows"));
                }
                if start < o.start + o.sectors && o.start < end {
                    return Err(format!(
                        "part: the windows of frontends {} and {frontend} overlap",
                        o.frontend
                    ));
                }
            }
            out.push(PartSpec {
                frontend,
                start,
                sectors,
                read_only,
            });
        }
        Ok(out)
    }

    /// The frontend domain of a backend directory `.../backend/vbd/<frontend>/<devid>`.
    fn frontend_of(dir: &str) -> Option<DomId> {
        let mut it = dir.rsplit('/');
        it.next()?;
        it.next()?.parse().ok()
    }

    impl BlockDevice for Disk {
        fn info(&self) -> DeviceInfo {
            match self {
                Disk::Ram(d) => d.info(),
                Disk::Part(p) => p.info(),
                Disk::Virtio(v) => {
                    let v = v.borrow();
                    DeviceInfo {
                        sector_size: 512,
                        physical_sector_size: 512,
                        sectors: v.blk.capacity(),
                        read_only: v.blk.readonly(),
                        discard: None,
                    }
                }
            }
        }

        fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
            match self {
                Disk::Ram(d) => d.read(offset, buf),
                Disk::Part(p) => p.read(offset, buf),
                Disk::Virtio(v) => {
                    let mut v = v.borrow_mut();
                    let block = v.check(offset, buf.len())?;
                    v.blk.read_blocks(block, buf).map_err(verr)
                }
            }
        }

        fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
            match self {
                Disk::Ram(d) => d.write(offset, data),
                Disk::Part(p) => p.write(offset, data),
                Disk::Virtio(v) => {
                    let mut v = v.borrow_mut();
                    let block = v.check(offset, data.len())?;
                    v.blk.write_blocks(block, data).map_err(verr)
                }
            }
        }

        fn flush(&mut self) -> Result<(), DeviceError> {
            match self {
                Disk::Ram(d) => d.flush(),
                Disk::Part(p) => p.flush(),
                Disk::Virtio(v) => v.borrow_mut().blk.flush().map_err(verr),
            }
        }

        fn discard(&mut self, offset: u64, len: u64, secure: bool) -> Result<(), DeviceError> {
            match self {
                Disk::Ram(d) => d.discard(offset, len, secure),
                Disk::Part(p) => p.discard(offset, len, secure),
                Disk::Virtio(_) => Err(DeviceError::Unsupported),
            }
        }
    }

    const MS: u64 = 1_000_000;
    /// Longest block in `SCHEDOP_poll` (a missed event costs at most this).
    const POLL_NS: u64 = 20 * MS;
    /// Backstop rescan of the store without a watch event.
    const RESCAN_NS: u64 = 1000 * MS;
    /// Ring mappings live in the top of the grant window, in blocks of 16 pages (the largest
    /// ring), so a multi-page ring is virtually contiguous; data mappings come from the
    /// bottom ([`MapWindow`]).
    const RING_BLOCK: u64 = 16 * PAGE_SIZE as u64;
    const RING_BLOCKS: u64 = 256;
    const RING_BASE: u64 = GRANT_MAP_END - RING_BLOCKS * RING_BLOCK;

    /// Mapping frontend grants by hypercall; the engine copies through the mapped pages.
    struct DomMapper {
        window: MapWindow,
    }

    impl GrantMapper for DomMapper {
        fn map(
            &mut self,
            domid: DomId,
            reqs: &[MapRequest],
            out: &mut Vec<Result<Mapping, GntStatus>>,
        ) {
            out.clear();
            for r in reqs {
                let Some(va) = self.window.alloc() else {
                    out.push(Err(GntStatus::NoDeviceSpace));
                    continue;
                };
                match gnttab::map(domid, r.gref, va, !r.writable) {
                    Ok(handle) => out.push(Ok(Mapping {
                        domid,
                        gref: r.gref,
                        writable: r.writable,
                        handle,
                        token: va,
                    })),
                    Err(e) => {
                        self.window.release(va);
                        out.push(Err(match e {
                            gnttab::GrantError::Status(s) => s,
                            gnttab::GrantError::Hypercall(_) => GntStatus::GeneralError,
                        }));
                    }
                }
            }
        }

        fn unmap(&mut self, maps: &[Mapping]) {
            for m in maps {
                match gnttab::unmap(m.handle, m.token) {
                    Ok(()) => self.window.release(m.token),
                    // Leave the address out of use rather than map over a live mapping.
                    Err(e) => println!("blkback: unmap of gref {} failed: {e:?}", m.gref),
                }
            }
        }

        fn read(&mut self, m: &Mapping, offset: usize, out: &mut [u8]) -> Result<(), GntStatus> {
            if offset.checked_add(out.len()).is_none_or(|e| e > PAGE_SIZE) {
                return Err(GntStatus::BadCopyArg);
            }
            // SAFETY: `m.token` is the address of a live mapping of one page made by `map`
            // (the engine passes only mappings it holds); the range is inside the page. The
            // frontend may change the bytes meanwhile: they are copied, never trusted.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    (m.token as usize + offset) as *const u8,
                    out.as_mut_ptr(),
                    out.len(),
                )
            };
            Ok(())
        }

        fn write(&mut self, m: &Mapping, offset: usize, data: &[u8]) -> Result<(), GntStatus> {
            if !m.writable {
                return Err(GntStatus::PermissionDenied);
            }
            if offset.checked_add(data.len()).is_none_or(|e| e > PAGE_SIZE) {
                return Err(GntStatus::BadCopyArg);
            }
            // SAFETY: as in `read`, and the mapping is writable.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    (m.token as usize + offset) as *mut u8,
                    data.len(),
                )
            };
            Ok(())
        }
    }

    struct Ports<'a>(&'a [EvtchnPort]);

    impl Notify for Ports<'_> {
        fn notify(&mut self, queue: u16) {
            if let Some(&p) = self.0.get(usize::from(queue)) {
                let _ = evtchn::send(p);
            }
        }
    }

    /// A mapped ring: its block and the grant handles of its pages.
    struct MappedRing {
        block: u64,
        pages: Vec<GrantHandle>,
    }

    struct Connected {
        vbd: Vbd<Io>,
        ports: Vec<EvtchnPort>,
        rings: Vec<MappedRing>,
    }

    struct Device {
        fe_state: String,
        last_fe: Option<Option<String>>,
        xb: BlkbackXenbus,
        disk: Option<Io>,
        conn: Option<Connected>,
        ever_connected: bool,
        /// The watch on the frontend's `state` (dropped when the device is forgotten).
        watch: Option<WatchHandle>,
    }

    struct Backend {
        me: DomId,
        offer: BackendOffer,
        ramdisk_sectors: u64,
        mapper: DomMapper,
        free_blocks: Vec<u64>,
        devices: BTreeMap<String, Device>,
        /// Backend dirs seen but not probed yet (frontend not there yet).
        waiting: BTreeMap<String, ()>,
        dirty: Rc<Cell<bool>>,
        connections: u64,
        probed: u64,
        /// `disk=virtio`: the virtio-blk disk.
        virtio: Option<Rc<RefCell<VirtioDisk>>>,
        /// Persistent mappings all devices together may keep (within the maptrack quota).
        persistent_budget: usize,
        /// `part=`: the frontends served from windows of it; without, the first frontend
        /// to probe gets the whole disk (`whole_owner`) and the others RAM disks.
        parts: Vec<PartSpec>,
        whole_owner: Option<DomId>,
    }

    impl Backend {
        /// The disk a newly probed device at `dir` is served from.
        fn disk_for(&mut self, dir: &str) -> Result<Io, DeviceError> {
            let fe = frontend_of(dir);
            if let Some(v) = &self.virtio {
                if !self.parts.is_empty() {
                    if let Some(p) = self.parts.iter().find(|p| Some(p.frontend) == fe) {
                        let whole = Disk::Virtio(v.clone());
                        return Partition::new(whole, p.start, p.sectors, p.read_only)
                            .map(|p| SyncIo::new(Disk::Part(Box::new(p))));
                    }
                } else if self.whole_owner.is_none() || self.whole_owner == fe {
                    self.whole_owner = fe;
                    return Ok(SyncIo::new(Disk::Virtio(v.clone())));
                }
            }
            RamDisk::new(self.ramdisk_sectors, 512).map(|d| SyncIo::new(Disk::Ram(d)))
        }

        fn base(&self) -> String {
            format!("/local/domain/{}/backend/vbd", self.me)
        }

        fn scan(&mut self, xb: &mut Bus) {
            for dir in xb.backend_devices(&self.base()) {
                if self.devices.contains_key(&dir) {
                    continue;
                }
                // Only a directory the toolstack left Initialising (as Linux's
                // xenbus_probe_node): one a detached device left Closed waits for the
                // toolstack to remove it, and is never probed again.
                if !backend_ready_to_probe(&mut XenbusStore { xb: &mut *xb }, &dir) {
                    continue;
                }
                // Probe once the frontend directory exists (its state is readable).
                let Some(fe_state) = xb.frontend_state_path(&dir) else {
                    if self.waiting.insert(dir.clone(), ()).is_none() {
                        println!("blkback: {dir}: waiting for its frontend");
                    }
                    continue;
                };
                self.waiting.remove(&dir);
                let probed = {
                    let mut s = XenbusStore { xb: &mut *xb };
                    BlkbackXenbus::probe(&mut s, &dir, self.offer.clone())
                };
                match probed {
                    Ok(dev) => {
                        let disk = self.disk_for(&dir);
                        let disk = match disk {
                            Ok(d) => d,
                            Err(e) => {
                                println!("blkback: {dir}: no RAM disk: {e}");
                                continue;
                            }
                        };
                        let dirty = self.dirty.clone();
                        let watch = match xb.watch(&fe_state, move |_| dirty.set(true)) {
                            Ok(w) => Some(w),
                            Err(e) => {
                                println!("blkback: {dir}: watch {fe_state}: {e:?}");
                                None
                            }
                        };
                        println!(
                            "blkback: {dir}: probed (frontend {}), InitWait",
                            dev.frontend_path()
                        );
                        self.probed += 1;
                        self.devices.insert(
                            dir,
                            Device {
                                fe_state,
                                last_fe: None,
                                xb: dev,
                                disk: Some(disk),
                                conn: None,
                                ever_connected: false,
                                watch,
                            },
                        );
                    }
                    Err(e) => println!("blkback: {dir}: probe failed: {e}"),
                }
            }
        }

        fn alloc_block(&mut self) -> Option<u64> {
            self.free_blocks.pop()
        }

        /// Map one queue's ring pages into a block; the ring region.
        fn map_ring(
            &mut self,
            domid: DomId,
            refs: &[u32],
        ) -> Result<(SharedRingMem, MappedRing), String> {
            let block = self.alloc_block().ok_or("no ring mapping space")?;
            let mut ring = MappedRing {
                block,
                pages: Vec::new(),
            };
            for (i, &gref) in refs.iter().enumerate() {
                let va = block + (i * PAGE_SIZE) as u64;
                match gnttab::map(domid, gref, va, false) {
                    Ok(h) => ring.pages.push(h),
                    Err(e) => {
                        self.unmap_ring(ring);
                        return Err(format!("ring-ref {gref}: {e:?}"));
                    }
                }
            }
            // SAFETY: the block's pages were just mapped RW from the frontend's grants and
            // stay mapped until `unmap_ring`, which runs only after the engine holding this
            // region is dropped; this domain touches them only through SharedRingMem.
            match unsafe { SharedRingMem::from_raw(block as *mut u8, refs.len() * PAGE_SIZE) } {
                Ok(mem) => Ok((mem, ring)),
                Err(e) => {
                    self.unmap_ring(ring);
                    Err(format!("ring region: {e}"))
                }
            }
        }

        fn unmap_ring(&mut self, ring: MappedRing) {
            for (i, h) in ring.pages.iter().enumerate() {
                let _ = gnttab::unmap(*h, ring.block + (i * PAGE_SIZE) as u64);
            }
            self.free_blocks.push(ring.block);
        }

        fn connect(&mut self, dir: &str, conn: &Connection) -> Result<Connected, String> {
            let mut rings = Vec::new();
            let mut mems = Vec::new();
            let mut ports = Vec::new();
            let fail = |b: &mut Self, rings: Vec<MappedRing>, ports: &[EvtchnPort]| {
                for r in rings {
                    b.unmap_ring(r);
                }
                for &p in ports {
                    let _ = evtchn::close(p);
                }
            };
            for q in &conn.queues {
                match self.map_ring(conn.frontend_id, &q.ring_refs) {
                    Ok((mem, r)) => {
                        mems.push(mem);
                        rings.push(r);
                    }
                    Err(e) => {
                        fail(self, rings, &ports);
                        return Err(e);
                    }
                }
                match evtchn::bind_interdomain(conn.frontend_id, q.event_channel) {
                    Ok(p) => {
                        let _ = evtchn::unmask(p);
                        ports.push(p);
                    }
                    Err(e) => {
                        fail(self, rings, &ports);
                        return Err(format!("event-channel {}: {e:?}", q.event_channel));
                    }
                }
            }
            let Some(dev) = self.devices.get_mut(dir) else {
                fail(self, rings, &ports);
                return Err("device gone".to_string());
            };
            let Some(io) = dev.disk.take() else {
                fail(self, rings, &ports);
                return Err("disk in use".to_string());
            };
            match Vbd::new(conn.vbd_config(&self.offer), io, mems) {
                Ok(vbd) => Ok(Connected { vbd, ports, rings }),
                Err(e) => {
                    // The RAM disk is lost with the engine that refused it; make a new one.
                    dev.disk = RamDisk::new(self.ramdisk_sectors, 512)
                        .ok()
                        .map(|d| SyncIo::new(Disk::Ram(d)));
                    fail(self, rings, &ports);
                    Err(format!("engine: {e}"))
                }
            }
        }

        /// Stop serving `dir`: unmap every grant, unbind, keep the disk for a reconnect.
        fn teardown(&mut self, dir: &str) {
            let Some(c) = self.devices.get_mut(dir).and_then(|d| d.conn.take()) else {
                return;
            };
            let Connected {
                mut vbd,
                ports,
                rings,
            } = c;
            vbd.shutdown(&mut self.mapper);
            let empty = RamDisk::new(1, 512).map(|d| SyncIo::new(Disk::Ram(d)));
            if let (Ok(e), Some(d)) = (empty, self.devices.get_mut(dir)) {
                d.disk = Some(core::mem::replace(vbd.io_mut(), e));
            }
            drop(vbd);
            for r in rings {
                self.unmap_ring(r);
            }
            for p in ports {
                let _ = evtchn::close(p);
            }
            self.rebalance();
        }

        /// Tear `dir` down and forget it (its frontend watch too); other devices are not
        /// touched.
        fn forget(&mut self, xb: &mut Bus, dir: &str) {
            self.teardown(dir);
            if let Some(dev) = self.devices.remove(dir)
                && let Some(w) = dev.watch
            {
                let _ = xb.unwatch(w);
            }
        }

        /// Hand frontend state changes to the xenbus logic.
        fn frontends(&mut self, xb: &mut Bus) {
            let dirs: Vec<String> = self.devices.keys().cloned().collect();
            for dir in dirs {
                let Some(dev) = self.devices.get_mut(&dir) else {
                    continue;
                };
                // The toolstack removed the device (a detach, forced or after a timeout), or
                // wrote it again for a re-attach of the same id: forget the old one (the
                // next scan probes a new one).
                let seen = dev.xb.backend_dir(&mut XenbusStore { xb: &mut *xb });
                if seen != BackendDir::Unchanged {
                    self.forget(xb, &dir);
                    self.dirty.set(true);
                    println!("blkback: {dir}: backend directory {seen:?}, device removed");
                    continue;
                }
                let now = match xb.read_string(Tx::NONE, &dev.fe_state) {
                    Ok(v) => Some(v),
                    // The frontend's home is gone (its domain was released): so is the device.
                    Err(XenError::EACCES) => {
                        self.forget(xb, &dir);
                        println!("blkback: {dir}: frontend domain gone, device removed");
                        continue;
                    }
                    Err(_) => None,
                };
                if dev.last_fe.as_ref() == Some(&now) {
                    continue;
                }
                dev.last_fe = Some(now);
                let action = {
                    let mut s = XenbusStore { xb: &mut *xb };
                    dev.xb.frontend_changed(&mut s)
                };
                match action {
                    Ok(Action::None) => {}
                    Ok(Action::Connect(conn)) => match self.connect(&dir, &conn) {
                        Ok(c) => {
                            let adv = c.vbd.advertised();
                            let Some(dev) = self.devices.get_mut(&dir) else {
                                continue;
                            };
                            let nq = c.ports.len();
                            dev.conn = Some(c);
                            let mut s = XenbusStore { xb: &mut *xb };
                            match dev.xb.connected(&mut s, &adv) {
                                Ok(()) => {
                                    dev.ever_connected = true;
                                    self.connections += 1;
                                    self.rebalance();
                                    println!(
                                        "blkback: {dir}: connected: {} queue(s), ring order {}, persistent {}, {} sectors",
                                        nq, conn.ring_page_order, conn.persistent, adv.sectors
                                    );
                                }
                                Err(e) => {
                                    println!("blkback: {dir}: connect: {e}");
                                    self.teardown(&dir);
                                }
                            }
                        }
                        Err(why) => {
                            println!("blkback: {dir}: cannot connect: {why}");
                            let e = XenbusError::invalid(
                                path(&dir, "frontend"),
                                &why,
                                "rings and event channels this backend can map and bind",
                            );
                            let mut s = XenbusStore { xb: &mut *xb };
                            let _ = dev_fail(&mut self.devices, &dir, &mut s, &e);
                        }
                    },
                    Ok(Action::Disconnect { remove }) => {
                        self.teardown(&dir);
                        if let Some(dev) = self.devices.get_mut(&dir) {
                            let mut s = XenbusStore { xb: &mut *xb };
                            let _ = dev.xb.disconnected(&mut s);
                        }
                        println!("blkback: {dir}: frontend closed, disconnected");
                        if remove {
                            self.forget(xb, &dir);
                            println!("blkback: {dir}: offline, device removed");
                        }
                    }
                    Ok(Action::Remove) => {
                        self.forget(xb, &dir);
                        println!("blkback: {dir}: frontend gone, device removed");
                    }
                    Err(e) => println!("blkback: {dir}: {e}"),
                }
            }
        }

        /// Serve every connected device; a device whose frontend broke its ring is closed.
        fn serve(&mut self, xb: &mut Bus) {
            let mut broken = Vec::new();
            for (dir, dev) in &mut self.devices {
                if let Some(c) = &mut dev.conn
                    && let Err(d) = c.vbd.service(&mut self.mapper, &mut Ports(&c.ports))
                {
                    println!("blkback: {dir}: {d}");
                    broken.push(dir.clone());
                }
            }
            for dir in broken {
                self.teardown(&dir);
                if let Some(dev) = self.devices.get_mut(&dir) {
                    let mut s = XenbusStore { xb: &mut *xb };
                    let _ = dev.xb.close(&mut s);
                }
            }
        }

        /// Divide the persistent-grant budget evenly among the connected queues (after
        /// every connect and disconnect), so no frontend's pool starves another's I/O.
        fn rebalance(&mut self) {
            let queues = self
                .devices
                .values()
                .filter_map(|d| d.conn.as_ref())
                .map(|c| c.vbd.queues())
                .sum();
            let share = persistent_share(self.persistent_budget, queues);
            if queues > 0 {
                println!(
                    "blkback: persistent-grant budget {}: {share} per queue over {queues} queue(s)",
                    self.persistent_budget
                );
            }
            for c in self.devices.values_mut().filter_map(|d| d.conn.as_mut()) {
                c.vbd.set_persistent_limit(share, &mut self.mapper);
            }
        }

        fn ports(&self) -> Vec<EvtchnPort> {
            self.devices
                .values()
                .filter_map(|d| d.conn.as_ref())
                .flat_map(|c| c.ports.iter().copied())
                .collect()
        }

        /// Some device was probed, and every device is closed or gone.
        fn idle(&self) -> bool {
            self.probed > 0
                && self
                    .devices
                    .values()
                    .all(|d| d.conn.is_none() && d.xb.state() == XenbusState::Closed)
        }
    }

    fn dev_fail(
        devs: &mut BTreeMap<String, Device>,
        dir: &str,
        s: &mut XenbusStore<'_, RingTransport<SharedRingMem, EvtchnSignal>>,
        e: &XenbusError,
    ) -> Result<(), XenbusError> {
        match devs.get_mut(dir) {
            Some(d) => d.xb.fail(s, e),
            None => Ok(()),
        }
    }

    /// Self-layout mode: write the backend directory of `fe:devid` (as a toolstack would).
    fn write_backend_dir(xb: &mut Bus, me: DomId, fe: DomId, devid: u32) -> Result<(), XenError> {
        let dir = format!("/local/domain/{me}/backend/vbd/{fe}/{devid}");
        let fe_dir = format!("/local/domain/{fe}/device/vbd/{devid}");
        let fe_id = fe.to_string();
        // One transaction: the frontend sees the whole directory or none of it.
        xb.transaction(dom_rt::xenbus::TRANSACTION_TRIES, |xb, tx| {
            xb.mkdir(tx, &dir)?;
            xb.set_perms(tx, &dir, &[&format!("n{me}"), &format!("r{fe}")])?;
            for (k, v) in [
                ("frontend", fe_dir.as_str()),
                ("frontend-id", &fe_id),
                ("online", "1"),
                ("removable", "0"),
                ("bootable", "1"),
                ("dev", "xvda"),
                ("type", "phy"),
                ("mode", "w"),
                ("device-type", "disk"),
                ("state", "1"),
            ] {
                xb.write(tx, &path(&dir, k), v.as_bytes())?;
            }
            Ok(())
        })
    }

    pub fn main(si: &'static StartInfo) {
        let cmdline = si.cmdline();
        let maptrack: u32 = match dom_rt::cmdline_param(cmdline, "maptrack").map(str::parse) {
            None => shared_abi::grant_table::DEFAULT_MAPTRACK_QUOTA,
            Some(Ok(n)) if (64..=1 << 20).contains(&n) => n,
            Some(_) => {
                println!(
                    "blkback: maptrack= must be 64..=1048576 (this domain's quota); using the default"
                );
                shared_abi::grant_table::DEFAULT_MAPTRACK_QUOTA
            }
        };
        let mib: u64 = dom_rt::cmdline_param(cmdline, "ramdisk_mib")
            .and_then(|v| v.parse().ok())
            .filter(|&m| (1..=4096).contains(&m))
            .unwrap_or(8);
        let exit_when_idle = cmdline.split_whitespace().any(|w| w == "exit_when_idle");
        if si.xenstore_evtchn == 0 {
            println!("blkback: no xenstore event channel in the start info");
            return;
        }
        // SAFETY: the hypervisor maps this domain's xenstore ring page RW at
        // XENSTORE_RING_VA for its whole life; it is touched only through SharedRingMem.
        let ring = match unsafe { gnttab::ring_mem(XENSTORE_RING_VA) }.map(ClientRing::new) {
            Ok(Ok(r)) => r,
            _ => {
                println!("blkback: xenstore ring page unusable");
                return;
            }
        };
        let xs_port = si.xenstore_evtchn;
        let mut xb: Bus = Xenbus::new(RingTransport::new(ring, EvtchnSignal::new(xs_port)));
        let me = si.domid;
        if let Some(list) = dom_rt::cmdline_param(cmdline, "serve") {
            for item in list.split(',') {
                let parsed = item
                    .split_once(':')
                    .and_then(|(f, d)| Some((f.parse::<DomId>().ok()?, d.parse::<u32>().ok()?)));
                match parsed {
                    Some((fe, devid)) => {
                        if let Err(e) = write_backend_dir(&mut xb, me, fe, devid) {
                            println!("blkback: writing the backend dir of {item}: {e:?}");
                        }
                    }
                    None => println!("blkback: bad serve= entry {item:?}"),
                }
            }
        }
        let parts = match dom_rt::cmdline_param(cmdline, "part").map(parse_parts) {
            None => Vec::new(),
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                println!("blkback: {e}; refusing to serve anything");
                return;
            }
        };
        let virtio = if dom_rt::cmdline_param(cmdline, "disk") == Some("virtio") {
            match VirtioDisk::open() {
                Ok(v) => {
                    println!(
                        "blkback: virtio-blk disk: {} sectors{}",
                        v.blk.capacity(),
                        if v.blk.readonly() { ", read-only" } else { "" }
                    );
                    Some(v)
                }
                Err(e) => {
                    println!("blkback: disk=virtio: {e}; serving RAM disks");
                    None
                }
            }
        } else {
            None
        };
        let mut b = Backend {
            me,
            offer: BackendOffer::default(),
            ramdisk_sectors: mib * 2048,
            mapper: DomMapper {
                window: MapWindow::new(),
            },
            free_blocks: (0..RING_BLOCKS)
                .rev()
                .map(|i| RING_BASE + i * RING_BLOCK)
                .collect(),
            devices: BTreeMap::new(),
            waiting: BTreeMap::new(),
            dirty: Rc::new(Cell::new(true)),
            connections: 0,
            probed: 0,
            virtio: virtio.map(|v| Rc::new(RefCell::new(v))),
            persistent_budget: persistent_budget(maptrack as usize),
            parts,
            whole_owner: None,
        };
        let dirty = b.dirty.clone();
        if let Err(e) = xb.watch(&b.base(), move |_| dirty.set(true)) {
            println!("blkback: watch {}: {e:?}", b.base());
        }
        println!(
            "blkback: domain {me} serving vbds under {} from {mib} MiB RAM disks",
            b.base()
        );
        let mut next_rescan = 0;
        loop {
            let _ = xb.poll();
            xb.dispatch();
            let now = time::now_ns();
            if b.dirty.replace(false) || now >= next_rescan {
                next_rescan = now + RESCAN_NS;
                b.scan(&mut xb);
                b.frontends(&mut xb);
            }
            b.serve(&mut xb);
            if exit_when_idle && b.idle() {
                println!("blkback: every device closed; exiting");
                return;
            }
            let mut ports = b.ports();
            ports.push(xs_port);
            let _ = hypercall::sched_poll(&ports, time::now_ns() + POLL_NS);
            for p in ports {
                dom_rt::event::clear_pending(p);
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
fn main() {
    eprintln!("blkback-domain is a Bulkhead domain: build it with --target x86_64-unknown-none");
    std::process::exit(2);
}
