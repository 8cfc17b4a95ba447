//! Bulkhead's start-info page for PV domains, the fixed domain address-space layout, and the
//! domain entry contract.
//!
//! A Bulkhead PV domain runs in ring 3 in an address space only the hypervisor edits. Every
//! domain sees the same layout, all of it inside the lowest 512 GiB (PML4 slot 0):
//!
//! | range | what | domain access |
//! |---|---|---|
//! | `0 .. 4 MiB` | never mapped (catches null and small-offset pointers) | – |
//! | [`ELF_LOAD_BASE`] `..` [`ELF_LOAD_END`] (4 MiB .. 1 GiB) | the domain's ELF `PT_LOAD` segments | as the segment says (text RX, rodata R, data/bss RW) |
//! | [`START_INFO_VA`] (1 GiB) | this page, [`StartInfo`] | R |
//! | [`SHARED_INFO_VA`] | Xen's `shared_info` page | RW |
//! | [`CONSOLE_RING_VA`] | the console ring (`xencons_interface`) | RW |
//! | [`XENSTORE_RING_VA`] | the xenstore ring (`xenstore_domain_interface`) | RW |
//! | [`GRANT_TABLE_VA`] `..` + [`GRANT_TABLE_FRAMES`] pages | the domain's own grant table (v1 entries it writes; `GNTTABOP_setup_table` reports these pages' frame numbers, `va >> 12`) | RW |
//! | [`GRANT_MAP_BASE`] `..` [`GRANT_MAP_END`] (1.5 GiB .. 2 GiB) | the window `GNTTABOP_map_grant_ref` installs other domains' granted pages in (`host_addr`), read-only if mapped read-only | as mapped |
//! | [`HEAP_BASE`] `..` [`HEAP_END`] (2 GiB .. 256 GiB) | the initial heap, and every page `memory_op` adds | RW |
//! | [`STACK_TOP`]` - stack_pages * 4 KiB .. `[`STACK_TOP`] | the boot stack; the page below it is never mapped (guard) | RW |
//! | [`DOMAIN_VA_END`] (512 GiB) and above | never mapped for the domain; the hypervisor lives in the upper half | – |
//!
//! Every mapping is NX except the ELF's executable segments.
//!
//! **Entry contract** ([`EntryState`]): the domain's first instruction is the ELF entry point,
//! executed in ring 3 (CPL 3, 64-bit code segment) with `RSP` = [`STACK_TOP`] (16-byte
//! aligned, nothing pushed), `RDI` = [`START_INFO_VA`], `RFLAGS` = IF only, every other
//! general-purpose register zero and the FPU/SSE state at its reset value. It enters the
//! hypervisor with `syscall` (see [`crate::hypercall`]).
//!
//! The start-info page is written by the hypervisor before the domain runs and never changes
//! afterwards; the domain maps it read-only. A domain checks [`StartInfo::decode`] (magic,
//! version, lengths) before trusting any field.

use crate::assert_layout;
use crate::capability::Capabilities;

/// Lowest address a domain ELF segment may occupy.
pub const ELF_LOAD_BASE: u64 = 4 << 20;
/// End (exclusive) of the range a domain ELF segment may occupy.
pub const ELF_LOAD_END: u64 = 1 << 30;
/// The start-info page (read-only to the domain).
pub const START_INFO_VA: u64 = 1 << 30;
/// The `shared_info` page.
pub const SHARED_INFO_VA: u64 = START_INFO_VA + 0x1000;
/// The console ring page.
pub const CONSOLE_RING_VA: u64 = START_INFO_VA + 0x2000;
/// The xenstore ring page.
pub const XENSTORE_RING_VA: u64 = START_INFO_VA + 0x3000;
/// End (exclusive) of the special-page window that starts at [`START_INFO_VA`].
pub const SPECIAL_END: u64 = START_INFO_VA + (2 << 20);
/// The domain's grant table: [`GRANT_TABLE_FRAMES`] pages inside the special window.
pub const GRANT_TABLE_VA: u64 = START_INFO_VA + 0x10000;
/// Pages of grant table every domain gets (512 v1 entries each).
pub const GRANT_TABLE_FRAMES: u64 = 4;
/// Start of the grant-mapping window (page-aligned `host_addr`s of `GNTTABOP_map_grant_ref`).
pub const GRANT_MAP_BASE: u64 = 3 << 29;
/// End (exclusive) of the grant-mapping window.
pub const GRANT_MAP_END: u64 = HEAP_BASE;
const _: () = assert!(
    GRANT_TABLE_VA + GRANT_TABLE_FRAMES * 4096 <= SPECIAL_END && GRANT_MAP_BASE >= SPECIAL_END
);
/// Start of the heap window: the initial heap, and the only place `memory_op` adds or removes
/// pages.
pub const HEAP_BASE: u64 = 2 << 30;
/// End (exclusive) of the heap window.
pub const HEAP_END: u64 = 256 << 30;
/// Start of the device window: the uncached mappings of a driver domain's BAR pages
/// (`physdev::MAP_BAR`), never part of the domain's memory nor of its DMA space.
pub const DEVICE_MMIO_BASE: u64 = HEAP_END;
/// End (exclusive) of the device window.
pub const DEVICE_MMIO_END: u64 = 320 << 30;
/// End (exclusive) of every domain address: one PML4 slot.
pub const DOMAIN_VA_END: u64 = 512 << 30;
/// Top of the boot stack (exclusive); the initial `RSP`.
pub const STACK_TOP: u64 = DOMAIN_VA_END - (2 << 20);
/// Lowest address of the stack window: stacks grow down from [`STACK_TOP`] at most to here
/// (room for [`MAX_STACK_PAGES`] plus the guard page).
pub const STACK_WINDOW_BASE: u64 = STACK_TOP - ((MAX_STACK_PAGES + 1) * 4096);
/// Pages of boot stack the builder maps.
pub const DEFAULT_STACK_PAGES: u64 = 16;
/// Largest boot stack the layout allows.
pub const MAX_STACK_PAGES: u64 = 256;

/// `RFLAGS` at entry: only IF (bit 9) and the always-one bit 1.
pub const ENTRY_RFLAGS: u64 = 0x202;

/// True if `va` lies in the part of the address space a domain may ever have mapped.
pub const fn is_domain_va(va: u64) -> bool {
    va < DOMAIN_VA_END
}

/// The register state a domain's boot vCPU starts with (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryState {
    pub rip: u64,
    pub rsp: u64,
    pub rdi: u64,
    pub rflags: u64,
}

impl EntryState {
    /// The entry state for an ELF entry point.
    pub const fn for_entry(entry: u64) -> EntryState {
        EntryState {
            rip: entry,
            rsp: STACK_TOP,
            rdi: START_INFO_VA,
            rflags: ENTRY_RFLAGS,
        }
    }
}

/// `"BHSTART\0"`.
pub const START_INFO_MAGIC: [u8; 8] = *b"BHSTART\0";
/// Layout version of [`StartInfo`]; bumped on any incompatible change.
pub const START_INFO_VERSION: u32 = 1;
/// Bytes reserved for the name (the manifest allows at most 32).
pub const NAME_LEN: usize = 32;
/// Bytes reserved for the command line (the manifest allows at most 1024).
pub const CMDLINE_LEN: usize = 1024;
/// Most PCI functions one domain can be assigned.
pub const MAX_DEVICES: usize = 16;

/// A PCI function address: segment, bus, device (5 bits) and function (3 bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PciAddress {
    pub segment: u16,
    pub bus: u8,
    /// `device << 3 | function`.
    pub devfn: u8,
}
assert_layout!(PciAddress, 4; segment @ 0, bus @ 2, devfn @ 3);

/// The start-info page every Bulkhead PV domain receives (pointed to by `RDI` at entry).
/// All addresses are domain virtual addresses; an event channel of 0 means "none".
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StartInfo {
    pub magic: [u8; 8],
    pub version: u32,
    /// `size_of::<StartInfo>()` as the writer saw it.
    pub size: u32,
    pub domid: u16,
    pub pad0: u16,
    pub nr_vcpus: u32,
    /// [`Capabilities`] bits.
    pub capabilities: u64,
    /// The domain's memory limit in pages (everything it holds counts, page tables too).
    pub max_pages: u64,
    pub shared_info_va: u64,
    pub console_ring_va: u64,
    pub xenstore_ring_va: u64,
    pub console_evtchn: u32,
    pub xenstore_evtchn: u32,
    pub heap_va: u64,
    pub heap_pages: u64,
    pub stack_top: u64,
    pub stack_pages: u64,
    pub name_len: u32,
    pub cmdline_len: u32,
    pub nr_devices: u32,
    pub pad1: u32,
    pub name: [u8; NAME_LEN],
    pub devices: [PciAddress; MAX_DEVICES],
    pub cmdline: [u8; CMDLINE_LEN],
}
assert_layout!(StartInfo, 1240; magic @ 0, version @ 8, size @ 12, domid @ 16, nr_vcpus @ 20,
    capabilities @ 24, max_pages @ 32, shared_info_va @ 40, console_ring_va @ 48,
    xenstore_ring_va @ 56, console_evtchn @ 64, xenstore_evtchn @ 68, heap_va @ 72,
    heap_pages @ 80, stack_top @ 88, stack_pages @ 96, name_len @ 104, cmdline_len @ 108,
    nr_devices @ 112, name @ 120, devices @ 152, cmdline @ 216);

/// Size of the encoded start info.
pub const START_INFO_SIZE: usize = core::mem::size_of::<StartInfo>();

/// Why a start-info page was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartInfoError {
    Truncated { have: usize },
    BadMagic,
    UnsupportedVersion { found: u32 },
    BadSize { found: u32 },
    NameLength { len: u32 },
    CmdlineLength { len: u32 },
    DeviceCount { count: u32 },
}

impl core::fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            StartInfoError::Truncated { have } => {
                write!(f, "start info is {have} bytes, {START_INFO_SIZE} needed")
            }
            StartInfoError::BadMagic => write!(f, "start info magic is not \"BHSTART\""),
            StartInfoError::UnsupportedVersion { found } => write!(
                f,
                "start info version {found}, this runtime reads {START_INFO_VERSION}"
            ),
            StartInfoError::BadSize { found } => {
                write!(f, "start info size {found}, expected {START_INFO_SIZE}")
            }
            StartInfoError::NameLength { len } => {
                write!(f, "start info name_len {len} outside 0..={NAME_LEN}")
            }
            StartInfoError::CmdlineLength { len } => {
                write!(f, "start info cmdline_len {len} outside 0..={CMDLINE_LEN}")
            }
            StartInfoError::DeviceCount { count } => {
                write!(f, "start info nr_devices {count} outside 0..={MAX_DEVICES}")
            }
        }
    }
}

impl Default for StartInfo {
    fn default() -> Self {
        StartInfo {
            magic: START_INFO_MAGIC,
            version: START_INFO_VERSION,
            size: START_INFO_SIZE as u32,
            domid: 0,
            pad0: 0,
            nr_vcpus: 0,
            capabilities: 0,
            max_pages: 0,
            shared_info_va: SHARED_INFO_VA,
            console_ring_va: CONSOLE_RING_VA,
            xenstore_ring_va: XENSTORE_RING_VA,
            console_evtchn: 0,
            xenstore_evtchn: 0,
            heap_va: HEAP_BASE,
            heap_pages: 0,
            stack_top: STACK_TOP,
            stack_pages: 0,
            name_len: 0,
            cmdline_len: 0,
            nr_devices: 0,
            pad1: 0,
            name: [0; NAME_LEN],
            devices: [PciAddress::default(); MAX_DEVICES],
            cmdline: [0; CMDLINE_LEN],
        }
    }
}

/// Little-endian cursor used by encode/decode (no `unsafe` byte views of the struct).
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[self.at..self.at + N]);
        self.at += N;
        out
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

impl StartInfo {
    /// The capabilities this domain holds (unknown bits dropped).
    pub fn capabilities(&self) -> Capabilities {
        Capabilities::from_bits_truncate(self.capabilities)
    }

    /// The domain's name (empty if the bytes are not UTF-8, which the builder never writes).
    pub fn name(&self) -> &str {
        let len = (self.name_len as usize).min(NAME_LEN);
        core::str::from_utf8(&self.name[..len]).unwrap_or("")
    }

    /// The domain's command line (empty if not UTF-8).
    pub fn cmdline(&self) -> &str {
        let len = (self.cmdline_len as usize).min(CMDLINE_LEN);
        core::str::from_utf8(&self.cmdline[..len]).unwrap_or("")
    }

    /// The assigned PCI functions.
    pub fn devices(&self) -> &[PciAddress] {
        &self.devices[..(self.nr_devices as usize).min(MAX_DEVICES)]
    }

    /// Set the name, truncated to [`NAME_LEN`] bytes at a character boundary.
    pub fn set_name(&mut self, name: &str) {
        let n = truncate_at_char(name, NAME_LEN);
        self.name = [0; NAME_LEN];
        self.name[..n.len()].copy_from_slice(n.as_bytes());
        self.name_len = n.len() as u32;
    }

    /// Set the command line, truncated to [`CMDLINE_LEN`] bytes at a character boundary.
    pub fn set_cmdline(&mut self, cmdline: &str) {
        let c = truncate_at_char(cmdline, CMDLINE_LEN);
        self.cmdline = [0; CMDLINE_LEN];
        self.cmdline[..c.len()].copy_from_slice(c.as_bytes());
        self.cmdline_len = c.len() as u32;
    }

    /// Set the assigned devices (at most [`MAX_DEVICES`]; extra ones are dropped, so the
    /// builder checks the count first).
    pub fn set_devices(&mut self, devices: &[PciAddress]) {
        let n = devices.len().min(MAX_DEVICES);
        self.devices = [PciAddress::default(); MAX_DEVICES];
        self.devices[..n].copy_from_slice(&devices[..n]);
        self.nr_devices = n as u32;
    }

    /// The page's bytes, little-endian, exactly as `repr(C)` lays them out.
    pub fn encode(&self) -> [u8; START_INFO_SIZE] {
        let mut out = [0u8; START_INFO_SIZE];
        let mut at = 0;
        let mut put = |b: &[u8]| {
            out[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        };
        put(&self.magic);
        put(&self.version.to_le_bytes());
        put(&self.size.to_le_bytes());
        put(&self.domid.to_le_bytes());
        put(&self.pad0.to_le_bytes());
        put(&self.nr_vcpus.to_le_bytes());
        for v in [
            self.capabilities,
            self.max_pages,
            self.shared_info_va,
            self.console_ring_va,
            self.xenstore_ring_va,
        ] {
            put(&v.to_le_bytes());
        }
        put(&self.console_evtchn.to_le_bytes());
        put(&self.xenstore_evtchn.to_le_bytes());
        for v in [
            self.heap_va,
            self.heap_pages,
            self.stack_top,
            self.stack_pages,
        ] {
            put(&v.to_le_bytes());
        }
        for v in [self.name_len, self.cmdline_len, self.nr_devices, self.pad1] {
            put(&v.to_le_bytes());
        }
        put(&self.name);
        for d in &self.devices {
            put(&d.segment.to_le_bytes());
            put(&[d.bus, d.devfn]);
        }
        put(&self.cmdline);
        out
    }

    /// Decode and check a start-info page: magic, version, size and every length field.
    pub fn decode(bytes: &[u8]) -> Result<StartInfo, StartInfoError> {
        if bytes.len() < START_INFO_SIZE {
            return Err(StartInfoError::Truncated { have: bytes.len() });
        }
        let mut c = Cursor { bytes, at: 0 };
        let mut s = StartInfo {
            magic: c.take(),
            version: c.u32(),
            size: c.u32(),
            domid: c.u16(),
            pad0: c.u16(),
            nr_vcpus: c.u32(),
            capabilities: c.u64(),
            max_pages: c.u64(),
            shared_info_va: c.u64(),
            console_ring_va: c.u64(),
            xenstore_ring_va: c.u64(),
            console_evtchn: c.u32(),
            xenstore_evtchn: c.u32(),
            heap_va: c.u64(),
            heap_pages: c.u64(),
            stack_top: c.u64(),
            stack_pages: c.u64(),
            name_len: c.u32(),
            cmdline_len: c.u32(),
            nr_devices: c.u32(),
            pad1: c.u32(),
            name: c.take(),
            ..StartInfo::default()
        };
        for d in s.devices.iter_mut() {
            d.segment = c.u16();
            d.bus = c.take::<1>()[0];
            d.devfn = c.take::<1>()[0];
        }
        s.cmdline = c.take();
        if s.magic != START_INFO_MAGIC {
            return Err(StartInfoError::BadMagic);
        }
        if s.version != START_INFO_VERSION {
            return Err(StartInfoError::UnsupportedVersion { found: s.version });
        }
        if s.size as usize != START_INFO_SIZE {
            return Err(StartInfoError::BadSize { found: s.size });
        }
        if s.name_len as usize > NAME_LEN {
            return Err(StartInfoError::NameLength { len: s.name_len });
        }
        if s.cmdline_len as usize > CMDLINE_LEN {
            return Err(StartInfoError::CmdlineLength { len: s.cmdline_len });
        }
        if s.nr_devices as usize > MAX_DEVICES {
            return Err(StartInfoError::DeviceCount {
                count: s.nr_devices,
            });
        }
        Ok(s)
    }
}

fn truncate_at_char(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// The layout must stay consistent: windows ordered, page-aligned, inside one PML4 slot.
const _: () = {
    assert!(ELF_LOAD_BASE < ELF_LOAD_END && ELF_LOAD_END <= START_INFO_VA);
    assert!(XENSTORE_RING_VA + 0x1000 <= SPECIAL_END && SPECIAL_END <= HEAP_BASE);
    assert!(HEAP_END <= STACK_WINDOW_BASE && STACK_TOP < DOMAIN_VA_END);
    assert!(STACK_TOP.is_multiple_of(4096) && STACK_TOP.is_multiple_of(16));
    assert!(START_INFO_SIZE <= crate::PAGE_SIZE);
    assert!(DEFAULT_STACK_PAGES <= MAX_STACK_PAGES);
};

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StartInfo {
        let mut s = StartInfo {
            domid: 7,
            nr_vcpus: 2,
            capabilities: Capabilities::DOMAIN_CONTROL.bits(),
            max_pages: 1024,
            console_evtchn: 3,
            xenstore_evtchn: 4,
            heap_pages: 100,
            stack_pages: DEFAULT_STACK_PAGES,
            ..StartInfo::default()
        };
        s.set_name("hello-dom");
        s.set_cmdline("verbose=1");
        s.set_devices(&[PciAddress {
            segment: 0,
            bus: 0,
            devfn: 0x18,
        }]);
        s
    }

    #[test]
    fn start_info_encode_decode_round_trips() {
        let s = sample();
        let d = StartInfo::decode(&s.encode()).unwrap();
        assert_eq!(d.domid, 7);
        assert_eq!(d.name(), "hello-dom");
        assert_eq!(d.cmdline(), "verbose=1");
        assert_eq!(d.devices(), s.devices());
        assert_eq!(d.capabilities(), Capabilities::DOMAIN_CONTROL);
        assert_eq!(d.encode(), s.encode());
    }

    #[test]
    fn start_info_encoding_matches_repr_c_offsets() {
        let b = sample().encode();
        assert_eq!(&b[0..8], b"BHSTART\0");
        assert_eq!(u16::from_le_bytes([b[16], b[17]]), 7);
        assert_eq!(&b[120..129], b"hello-dom");
        assert_eq!(b[152 + 3], 0x18);
        assert_eq!(&b[216..225], b"verbose=1");
    }

    #[test]
    fn start_info_decode_refuses_bad_fields() {
        let good = sample().encode();
        assert_eq!(
            StartInfo::decode(&good[..100]).unwrap_err(),
            StartInfoError::Truncated { have: 100 }
        );
        let mut b = good;
        b[0] = b'X';
        assert_eq!(StartInfo::decode(&b).unwrap_err(), StartInfoError::BadMagic);
        let mut b = good;
        b[8] = 9;
        assert!(matches!(
            StartInfo::decode(&b),
            Err(StartInfoError::UnsupportedVersion { found: 9 })
        ));
        let mut b = good;
        b[104] = 33;
        assert!(matches!(
            StartInfo::decode(&b),
            Err(StartInfoError::NameLength { len: 33 })
        ));
        let mut b = good;
        b[108..112].copy_from_slice(&2000u32.to_le_bytes());
        assert!(matches!(
            StartInfo::decode(&b),
            Err(StartInfoError::CmdlineLength { .. })
        ));
        let mut b = good;
        b[112] = 17;
        assert!(matches!(
            StartInfo::decode(&b),
            Err(StartInfoError::DeviceCount { count: 17 })
        ));
    }

    #[test]
    fn names_are_truncated_at_character_boundaries() {
        let mut s = StartInfo::default();
        s.set_name("ééééééééééééééééé"); // 34 bytes
        assert_eq!(s.name_len, 32);
        assert_eq!(s.name().chars().count(), 16);
    }

    #[test]
    fn entry_state_follows_the_contract() {
        let e = EntryState::for_entry(0x40_1000);
        assert_eq!(e.rsp % 16, 0);
        assert_eq!(e.rdi, START_INFO_VA);
        assert!(!is_domain_va(0xffff_8000_0000_0000));
        assert!(is_domain_va(STACK_TOP - 1));
    }
}
