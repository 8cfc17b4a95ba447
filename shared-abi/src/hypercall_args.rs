//! Argument structures of the hypercalls Bulkhead's PV domains use, with their byte encodings.
//!
//! Xen's layouts (`sched.h`, `vcpu.h`, `memory.h`, `version.h`) where Xen has the interface,
//! each with compile-time size/offset assertions; for `domctl`, Xen's header (`cmd`,
//! `interface_version`, `domain`) with Bulkhead's own payloads and interface version, because
//! Xen's domctl is not a stable ABI and Bulkhead implements only a subset.
//!
//! Every struct converts to and from little-endian bytes through [`Wire`], so the hypervisor
//! copies a domain's bytes in through its checked accessor and decodes them without ever
//! viewing guest memory as a Rust reference.

use crate::{DomId, assert_layout};

/// A fixed-size structure with a little-endian byte encoding matching its `repr(C)` layout.
pub trait Wire: Sized {
    /// Encoded size in bytes (= `size_of::<Self>()`).
    const SIZE: usize;
    /// Decode from the first `SIZE` bytes; `None` if `bytes` is shorter.
    fn decode(bytes: &[u8]) -> Option<Self>;
    /// Encode into the first `SIZE` bytes of `out`; returns `false` (writing nothing) if `out`
    /// is shorter.
    fn encode(&self, out: &mut [u8]) -> bool;
}

struct Rd<'a>(&'a [u8], usize);
impl Rd<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut o = [0u8; N];
        o.copy_from_slice(&self.0[self.1..self.1 + N]);
        self.1 += N;
        o
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

struct Wr<'a>(&'a mut [u8], usize);
impl Wr<'_> {
    fn put(&mut self, b: &[u8]) {
        self.0[self.1..self.1 + b.len()].copy_from_slice(b);
        self.1 += b.len();
    }
}

macro_rules! wire_struct {
    ($ty:ident, $size:expr, |$r:ident| $dec:expr, |$s:ident, $w:ident| $enc:block) => {
        impl Wire for $ty {
            const SIZE: usize = $size;
            fn decode(bytes: &[u8]) -> Option<Self> {
                if bytes.len() < Self::SIZE {
                    return None;
                }
                let mut $r = Rd(bytes, 0);
                Some($dec)
            }
            fn encode(&self, out: &mut [u8]) -> bool {
                if out.len() < Self::SIZE {
                    return false;
                }
                let $s = self;
                let mut $w = Wr(out, 0);
                $enc
                true
            }
        }
        const _: () = assert!(::core::mem::size_of::<$ty>() == $size);
    };
}

/// `sched_shutdown`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedShutdown {
    pub reason: u32,
}
assert_layout!(SchedShutdown, 4; reason @ 0);
wire_struct!(
    SchedShutdown,
    4,
    |r| SchedShutdown { reason: r.u32() },
    |s, w| {
        w.put(&s.reason.to_le_bytes());
    }
);

/// `sched_poll`: wait until one of `nr_ports` event channels (an array of `u32` at `ports`)
/// is pending, or until system time `timeout` (ns; 0 = no timeout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedPoll {
    pub ports: u64,
    pub nr_ports: u32,
    pub pad: u32,
    pub timeout: u64,
}
assert_layout!(SchedPoll, 24; ports @ 0, nr_ports @ 8, timeout @ 16);
wire_struct!(
    SchedPoll,
    24,
    |r| SchedPoll {
        ports: r.u64(),
        nr_ports: r.u32(),
        pad: r.u32(),
        timeout: r.u64()
    },
    |s, w| {
        w.put(&s.ports.to_le_bytes());
        w.put(&s.nr_ports.to_le_bytes());
        w.put(&s.pad.to_le_bytes());
        w.put(&s.timeout.to_le_bytes());
    }
);
/// Most ports one `SCHEDOP_poll` may name (Xen's limit).
pub const SCHED_POLL_MAX_PORTS: u32 = 128;

/// `sched_remote_shutdown`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedRemoteShutdown {
    pub domain_id: DomId,
    pub pad: u16,
    pub reason: u32,
}
assert_layout!(SchedRemoteShutdown, 8; domain_id @ 0, reason @ 4);
wire_struct!(
    SchedRemoteShutdown,
    8,
    |r| SchedRemoteShutdown {
        domain_id: r.u16(),
        pad: r.u16(),
        reason: r.u32()
    },
    |s, w| {
        w.put(&s.domain_id.to_le_bytes());
        w.put(&s.pad.to_le_bytes());
        w.put(&s.reason.to_le_bytes());
    }
);

/// `vcpu_set_singleshot_timer`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuSetSingleshotTimer {
    /// Absolute system time in ns.
    pub timeout_abs_ns: u64,
    /// `VCPU_SSHOTTMR_future` (bit 0).
    pub flags: u32,
    pub pad: u32,
}
assert_layout!(VcpuSetSingleshotTimer, 16; timeout_abs_ns @ 0, flags @ 8);
wire_struct!(
    VcpuSetSingleshotTimer,
    16,
    |r| VcpuSetSingleshotTimer {
        timeout_abs_ns: r.u64(),
        flags: r.u32(),
        pad: r.u32()
    },
    |s, w| {
        w.put(&s.timeout_abs_ns.to_le_bytes());
        w.put(&s.flags.to_le_bytes());
        w.put(&s.pad.to_le_bytes());
    }
);

/// `vcpu_runstate_info`: the state (`RUNSTATE_*`), when it was entered, and the total time
/// spent in each state (ns, indexed by `RUNSTATE_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuRunstateInfo {
    pub state: i32,
    pub pad: u32,
    pub state_entry_time: u64,
    pub time: [u64; 4],
}
assert_layout!(VcpuRunstateInfo, 48; state @ 0, state_entry_time @ 8, time @ 16);
wire_struct!(
    VcpuRunstateInfo,
    48,
    |r| VcpuRunstateInfo {
        state: r.u32() as i32,
        pad: r.u32(),
        state_entry_time: r.u64(),
        time: [r.u64(), r.u64(), r.u64(), r.u64()]
    },
    |s, w| {
        w.put(&s.state.to_le_bytes());
        w.put(&s.pad.to_le_bytes());
        w.put(&s.state_entry_time.to_le_bytes());
        for t in s.time {
            w.put(&t.to_le_bytes());
        }
    }
);

/// `xen_memory_reservation`. For Bulkhead's PV domains a frame number is a page number of
/// the domain's own address space (`va >> 12`): domains never see machine frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XenMemoryReservation {
    /// Guest address of an array of `nr_extents` frame numbers (`u64`).
    pub extent_start: u64,
    pub nr_extents: u64,
    pub extent_order: u32,
    pub mem_flags: u32,
    pub domid: DomId,
    pub pad: [u16; 3],
}
assert_layout!(XenMemoryReservation, 32; extent_start @ 0, nr_extents @ 8, extent_order @ 16,
    mem_flags @ 20, domid @ 24);
wire_struct!(
    XenMemoryReservation,
    32,
    |r| XenMemoryReservation {
        extent_start: r.u64(),
        nr_extents: r.u64(),
        extent_order: r.u32(),
        mem_flags: r.u32(),
        domid: r.u16(),
        pad: [r.u16(), r.u16(), r.u16()]
    },
    |s, w| {
        w.put(&s.extent_start.to_le_bytes());
        w.put(&s.nr_extents.to_le_bytes());
        w.put(&s.extent_order.to_le_bytes());
        w.put(&s.mem_flags.to_le_bytes());
        w.put(&s.domid.to_le_bytes());
        for p in s.pad {
            w.put(&p.to_le_bytes());
        }
    }
);

/// `xen_feature_info` (`XENVER_get_features`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XenFeatureInfo {
    pub submap_idx: u32,
    pub submap: u32,
}
assert_layout!(XenFeatureInfo, 8; submap_idx @ 0, submap @ 4);
wire_struct!(
    XenFeatureInfo,
    8,
    |r| XenFeatureInfo {
        submap_idx: r.u32(),
        submap: r.u32()
    },
    |s, w| {
        w.put(&s.submap_idx.to_le_bytes());
        w.put(&s.submap.to_le_bytes());
    }
);

/// The `domctl` subset Bulkhead implements.
pub mod domctl {
    /// A NUL-padded 32-byte name field as text (up to the first NUL); `None` if not UTF-8.
    pub fn fixed_name(field: &[u8; 32]) -> Option<&str> {
        let end = field.iter().position(|&b| b == 0).unwrap_or(32);
        core::str::from_utf8(&field[..end]).ok()
    }

    /// `name` as a NUL-padded 32-byte field (at most 32 bytes are kept).
    pub fn to_fixed_name(name: &str) -> [u8; 32] {
        let mut f = [0u8; 32];
        let n = name.len().min(32);
        f[..n].copy_from_slice(&name.as_bytes()[..n]);
        f
    }

    use super::{Rd, Wire, Wr};
    use crate::{DomId, assert_layout};

    /// Bulkhead's domctl interface version ("BH" + 1). A caller built for Xen's domctl
    /// (version 0x18 and others) is refused with `-EACCES`, as Xen refuses a mismatch.
    pub const INTERFACE_VERSION: u32 = 0x4248_0001;

    /// `XEN_DOMCTL_destroydomain`.
    pub const DESTROYDOMAIN: u32 = 2;
    /// `XEN_DOMCTL_pausedomain`.
    pub const PAUSEDOMAIN: u32 = 3;
    /// `XEN_DOMCTL_unpausedomain`.
    pub const UNPAUSEDOMAIN: u32 = 4;
    /// `XEN_DOMCTL_getdomaininfo`: payload out = [`DomainInfo`].
    pub const GETDOMAININFO: u32 = 5;
    /// `XEN_DOMCTL_scheduler_op`: payload = [`SchedulerOp`].
    pub const SCHEDULER_OP: u32 = 16;
    /// Bulkhead: list domains (Xen does this with a sysctl): payload in = [`ListDomains`];
    /// returns the number of [`DomainInfo`] records written.
    pub const LIST_DOMAINS: u32 = 0x4248_0000;

    /// `XEN_SCHEDULER_CREDIT`.
    pub const SCHEDULER_CREDIT: u32 = 5;
    /// `XEN_DOMCTL_SCHEDOP_putinfo`.
    pub const SCHEDOP_PUTINFO: u32 = 0;
    /// `XEN_DOMCTL_SCHEDOP_getinfo`.
    pub const SCHEDOP_GETINFO: u32 = 1;

    /// `XEN_DOMINF_*` flag bits in [`DomainInfo::flags`]; the shutdown reason sits in bits
    /// 16..24 as in Xen.
    pub const DOMINF_DYING: u32 = 1 << 0;
    pub const DOMINF_SHUTDOWN: u32 = 1 << 2;
    pub const DOMINF_PAUSED: u32 = 1 << 3;
    pub const DOMINF_BLOCKED: u32 = 1 << 4;
    pub const DOMINF_RUNNING: u32 = 1 << 5;
    pub const DOMINF_SHUTDOWN_SHIFT: u32 = 16;

    /// Payload bytes after the header (Xen pads its union to 128 bytes).
    pub const PAYLOAD_LEN: usize = 128;
    /// Bytes of a whole domctl: 16-byte header + payload.
    pub const DOMCTL_LEN: usize = 16 + PAYLOAD_LEN;

    /// The domctl header (`xen_domctl` without its union).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DomctlHeader {
        pub cmd: u32,
        pub interface_version: u32,
        pub domain: DomId,
        pub pad: [u16; 3],
    }
    assert_layout!(DomctlHeader, 16; cmd @ 0, interface_version @ 4, domain @ 8);
    wire_struct!(
        DomctlHeader,
        16,
        |r| DomctlHeader {
            cmd: r.u32(),
            interface_version: r.u32(),
            domain: r.u16(),
            pad: [r.u16(), r.u16(), r.u16()]
        },
        |s, w| {
            w.put(&s.cmd.to_le_bytes());
            w.put(&s.interface_version.to_le_bytes());
            w.put(&s.domain.to_le_bytes());
            for p in s.pad {
                w.put(&p.to_le_bytes());
            }
        }
    );

    /// Bulkhead's domain lifecycle state codes in [`DomainInfo::state`].
    pub mod state {
        pub const BUILDING: u32 = 0;
        pub const RUNNING: u32 = 1;
        pub const PAUSED: u32 = 2;
        pub const SHUTDOWN: u32 = 3;
        pub const DYING: u32 = 4;
        pub const DEAD: u32 = 5;
    }

    /// What `GETDOMAININFO` and `LIST_DOMAINS` report about one domain.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DomainInfo {
        pub domid: DomId,
        pub pad0: u16,
        /// One of [`state`].
        pub state: u32,
        /// `DOMINF_*` bits.
        pub flags: u32,
        /// `SHUTDOWN_*` when shut down (also in `flags` bits 16..24).
        pub shutdown_reason: u32,
        /// Pages the domain holds now.
        pub tot_pages: u64,
        /// Its limit in pages.
        pub max_pages: u64,
        /// Total CPU time its vCPUs have run, ns.
        pub cpu_time: u64,
        pub nr_vcpus: u32,
        pub weight: u32,
        pub cap_percent: u32,
        pub pad1: u32,
        /// [`crate::capability::Capabilities`] bits.
        pub capabilities: u64,
        pub name: [u8; 32],
    }
    assert_layout!(DomainInfo, 96; domid @ 0, state @ 4, flags @ 8, shutdown_reason @ 12,
        tot_pages @ 16, max_pages @ 24, cpu_time @ 32, nr_vcpus @ 40, weight @ 44,
        cap_percent @ 48, capabilities @ 56, name @ 64);
    wire_struct!(
        DomainInfo,
        96,
        |r| DomainInfo {
            domid: r.u16(),
            pad0: r.u16(),
            state: r.u32(),
            flags: r.u32(),
            shutdown_reason: r.u32(),
            tot_pages: r.u64(),
            max_pages: r.u64(),
            cpu_time: r.u64(),
            nr_vcpus: r.u32(),
            weight: r.u32(),
            cap_percent: r.u32(),
            pad1: r.u32(),
            capabilities: r.u64(),
            name: r.bytes()
        },
        |s, w| {
            w.put(&s.domid.to_le_bytes());
            w.put(&s.pad0.to_le_bytes());
            for v in [s.state, s.flags, s.shutdown_reason] {
                w.put(&v.to_le_bytes());
            }
            for v in [s.tot_pages, s.max_pages, s.cpu_time] {
                w.put(&v.to_le_bytes());
            }
            for v in [s.nr_vcpus, s.weight, s.cap_percent, s.pad1] {
                w.put(&v.to_le_bytes());
            }
            w.put(&s.capabilities.to_le_bytes());
            w.put(&s.name);
        }
    );

    impl DomainInfo {
        /// The name as text (up to the first NUL).
        pub fn name(&self) -> &str {
            fixed_name(&self.name).unwrap_or("")
        }
    }

    /// `LIST_DOMAINS` input: report domains with id ≥ `first_domain`, at most `max_domains`
    /// records, into the array at `buffer`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ListDomains {
        pub first_domain: DomId,
        pub pad: u16,
        pub max_domains: u32,
        pub buffer: u64,
    }
    assert_layout!(ListDomains, 16; first_domain @ 0, max_domains @ 4, buffer @ 8);
    wire_struct!(
        ListDomains,
        16,
        |r| ListDomains {
            first_domain: r.u16(),
            pad: r.u16(),
            max_domains: r.u32(),
            buffer: r.u64()
        },
        |s, w| {
            w.put(&s.first_domain.to_le_bytes());
            w.put(&s.pad.to_le_bytes());
            w.put(&s.max_domains.to_le_bytes());
            w.put(&s.buffer.to_le_bytes());
        }
    );

    /// Bulkhead: the domains a xenstore service domain serves (needs `XENSTORE_SERVICE`):
    /// payload in = [`ListDomains`], whose `buffer` receives [`XenstoreDomain`] records for
    /// every domain but the caller with id ≥ `first_domain`; returns the number written.
    pub const XENSTORE_DOMAINS: u32 = 0x4248_0100;

    /// One `XENSTORE_DOMAINS` record: a domain, its lifecycle [`state`], and the unbound
    /// port it offers the xenstore domain for its ring (`StartInfo::xenstore_evtchn`; 0 =
    /// none, e.g. built before any xenstore domain).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct XenstoreDomain {
        pub domid: DomId,
        pub pad0: u16,
        pub state: u32,
        pub port: u32,
        pub pad1: u32,
    }
    assert_layout!(XenstoreDomain, 16; domid @ 0, state @ 4, port @ 8);
    wire_struct!(
        XenstoreDomain,
        16,
        |r| XenstoreDomain {
            domid: r.u16(),
            pad0: r.u16(),
            state: r.u32(),
            port: r.u32(),
            pad1: r.u32()
        },
        |s, w| {
            w.put(&s.domid.to_le_bytes());
            w.put(&s.pad0.to_le_bytes());
            for v in [s.state, s.port, s.pad1] {
                w.put(&v.to_le_bytes());
            }
        }
    );

    /// `xen_domctl_scheduler_op` with the credit scheduler's parameters. On `putinfo` a
    /// weight of 0 and a cap of `0xFFFF` mean "leave unchanged", as in Xen.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SchedulerOp {
        pub sched_id: u32,
        pub cmd: u32,
        pub weight: u16,
        /// Percent of one CPU; 0 = uncapped.
        pub cap: u16,
        pub pad: u32,
    }
    assert_layout!(SchedulerOp, 16; sched_id @ 0, cmd @ 4, weight @ 8, cap @ 10);
    wire_struct!(
        SchedulerOp,
        16,
        |r| SchedulerOp {
            sched_id: r.u32(),
            cmd: r.u32(),
            weight: r.u16(),
            cap: r.u16(),
            pad: r.u32()
        },
        |s, w| {
            w.put(&s.sched_id.to_le_bytes());
            w.put(&s.cmd.to_le_bytes());
            w.put(&s.weight.to_le_bytes());
            w.put(&s.cap.to_le_bytes());
            w.put(&s.pad.to_le_bytes());
        }
    );
    /// `putinfo` cap value meaning "unchanged".
    pub const CAP_UNCHANGED: u16 = 0xFFFF;

    /// Bulkhead: describe boot domain (manifest entry) [`BootDomain::index`], or the one
    /// named [`BootDomain::name`] when the index is [`BOOT_BY_NAME`]: payload in/out =
    /// [`BootDomain`] (its name, its current domain id, its lifecycle policies and the number
    /// of boot domains). Needs `DOMAIN_CONTROL`. No such entry: `-ESRCH`.
    pub const BOOT_DOMAIN_INFO: u32 = 0x4248_0200;
    /// Bulkhead: rebuild boot domain [`BootDomain::index`] (or by name) from its manifest
    /// entry and the ELF the boot image still holds, through the same builder as at boot,
    /// with its PCI devices re-assigned and its xenstore port offered again. Its previous
    /// domain is destroyed first (a shut-down one; a running one is `-EBUSY`). Answers the
    /// new domain id (also in the payload's `domid`). Needs `DOMAIN_CONTROL`.
    pub const REBUILD_BOOT_DOMAIN: u32 = 0x4248_0201;
    /// [`BootDomain::index`] value: look the entry up by [`BootDomain::name`].
    pub const BOOT_BY_NAME: u32 = u32::MAX;
    /// [`BootDomain::domid`] when the entry has no domain (refused at boot).
    pub const BOOT_NO_DOMAIN: DomId = 0;

    /// `BOOT_DOMAIN_INFO` / `REBUILD_BOOT_DOMAIN` payload. Policies are
    /// `LifecycleAction::code` bytes (0 destroy, 1 restart, 2 preserve).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct BootDomain {
        /// In: the manifest index, or [`BOOT_BY_NAME`]. Out: the index.
        pub index: u32,
        /// Out: the entry's current domain ([`BOOT_NO_DOMAIN`] if none).
        pub domid: DomId,
        pub pad0: u16,
        pub on_poweroff: u8,
        pub on_reboot: u8,
        pub on_crash: u8,
        pub pad1: u8,
        /// Out: how many boot domains the manifest names.
        pub nr_boot_domains: u32,
        /// In (by name) / out: the entry's name, NUL-padded.
        pub name: [u8; 32],
    }
    assert_layout!(BootDomain, 48; index @ 0, domid @ 4, on_poweroff @ 8, on_reboot @ 9,
        on_crash @ 10, nr_boot_domains @ 12, name @ 16);
    wire_struct!(
        BootDomain,
        48,
        |r| BootDomain {
            index: r.u32(),
            domid: r.u16(),
            pad0: r.u16(),
            on_poweroff: r.bytes::<1>()[0],
            on_reboot: r.bytes::<1>()[0],
            on_crash: r.bytes::<1>()[0],
            pad1: r.bytes::<1>()[0],
            nr_boot_domains: r.u32(),
            name: r.bytes()
        },
        |s, w| {
            w.put(&s.index.to_le_bytes());
            w.put(&s.domid.to_le_bytes());
            w.put(&s.pad0.to_le_bytes());
            w.put(&[s.on_poweroff, s.on_reboot, s.on_crash, s.pad1]);
            w.put(&s.nr_boot_domains.to_le_bytes());
            w.put(&s.name);
        }
    );

    impl BootDomain {
        /// The name as text (up to the first NUL); `None` if not UTF-8.
        pub fn name(&self) -> Option<&str> {
            fixed_name(&self.name)
        }

        /// Set the name (at most 32 bytes are kept).
        pub fn set_name(&mut self, name: &str) {
            self.name = to_fixed_name(name);
        }
    }

    /// Bulkhead: build a new domain at run time through the one builder boot domains go
    /// through, from an ELF image and a command line in the caller's memory: payload in/out =
    /// [`CreateDomain`]. Answers the new domain id (also in the payload's `domid`). Needs
    /// `DOMAIN_CONTROL`; `domain_control`, `xenstore_service` and `device_owner` cannot be
    /// granted this way (`-EPERM`). Bad sizes or fields: `-EINVAL`; an image over
    /// [`MAX_CREATE_ELF`]: `-E2BIG`; no memory: `-ENOMEM`; the image or command line not
    /// readable: `-EFAULT`. The xenstore and control domains learn of it on `VIRQ_DOM_EXC`.
    pub const CREATE_DOMAIN: u32 = 0x4248_0300;
    /// Largest ELF image `CREATE_DOMAIN` takes (bytes).
    pub const MAX_CREATE_ELF: u64 = 8 << 20;
    /// [`CreateDomain::flags`]: leave the domain paused (the toolstack unpauses it once its
    /// xenstore entries are written, as `xl create` does).
    pub const CREATE_PAUSED: u32 = 1;
    /// [`CreateDomain::flags`]: keep the domain (shut down, memory and console history kept,
    /// not scheduled) when it powers off (`SHUTDOWN_poweroff`), for inspection until a
    /// `DESTROYDOMAIN` — xl's `on_poweroff = "preserve"`.
    pub const CREATE_PRESERVE_POWEROFF: u32 = 1 << 1;
    /// Likewise when it reboots (`SHUTDOWN_reboot`): `on_reboot = "preserve"`.
    pub const CREATE_PRESERVE_REBOOT: u32 = 1 << 2;
    /// Likewise for every other reason (crash, suspend, watchdog): `on_crash = "preserve"`.
    /// A CPU fault still frees the domain at once, as for boot domains.
    pub const CREATE_PRESERVE_CRASH: u32 = 1 << 3;
    /// Every flag `CREATE_DOMAIN` knows; any other bit is `-EINVAL`.
    pub const CREATE_FLAGS: u32 =
        CREATE_PAUSED | CREATE_PRESERVE_POWEROFF | CREATE_PRESERVE_REBOOT | CREATE_PRESERVE_CRASH;

    /// `CREATE_DOMAIN` payload.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CreateDomain {
        /// The ELF image: address and length in the caller's memory.
        pub elf_va: u64,
        pub elf_len: u64,
        pub memory_kib: u64,
        /// The command line: address and length (at most 1024 bytes; 0 for none).
        pub cmdline_va: u64,
        pub cmdline_len: u32,
        pub vcpus: u32,
        pub weight: u32,
        pub cap_percent: u32,
        /// `Capabilities` bits.
        pub capabilities: u64,
        /// [`CREATE_PAUSED`].
        pub flags: u32,
        /// Out: the new domain.
        pub domid: DomId,
        pub pad1: u16,
        /// The name, NUL-padded.
        pub name: [u8; 32],
    }
    assert_layout!(CreateDomain, 96; elf_va @ 0, elf_len @ 8, memory_kib @ 16,
        cmdline_va @ 24, cmdline_len @ 32, vcpus @ 36, weight @ 40, cap_percent @ 44,
        capabilities @ 48, flags @ 56, domid @ 60, name @ 64);
    wire_struct!(
        CreateDomain,
        96,
        |r| CreateDomain {
            elf_va: r.u64(),
            elf_len: r.u64(),
            memory_kib: r.u64(),
            cmdline_va: r.u64(),
            cmdline_len: r.u32(),
            vcpus: r.u32(),
            weight: r.u32(),
            cap_percent: r.u32(),
            capabilities: r.u64(),
            flags: r.u32(),
            domid: r.u16(),
            pad1: r.u16(),
            name: r.bytes()
        },
        |s, w| {
            w.put(&s.elf_va.to_le_bytes());
            w.put(&s.elf_len.to_le_bytes());
            w.put(&s.memory_kib.to_le_bytes());
            w.put(&s.cmdline_va.to_le_bytes());
            w.put(&s.cmdline_len.to_le_bytes());
            w.put(&s.vcpus.to_le_bytes());
            w.put(&s.weight.to_le_bytes());
            w.put(&s.cap_percent.to_le_bytes());
            w.put(&s.capabilities.to_le_bytes());
            w.put(&s.flags.to_le_bytes());
            w.put(&s.domid.to_le_bytes());
            w.put(&s.pad1.to_le_bytes());
            w.put(&s.name);
        }
    );

    /// Bulkhead: move bytes on the management serial line (the machine's second UART, which
    /// `cargo hv run` connects to a unix socket for `hvctl`): payload in/out = [`MgmtIo`].
    /// [`MGMT_READ`] takes up to `len` bytes already received (never waits; 0 when none),
    /// [`MGMT_WRITE`] sends up to `len` bytes; both answer the count (also in `done`).
    /// `len` at most [`MGMT_IO_MAX`]. Needs `DOMAIN_CONTROL`; no such line: `-ENODEV`.
    pub const MGMT_IO: u32 = 0x4248_0400;
    pub const MGMT_READ: u32 = 0;
    pub const MGMT_WRITE: u32 = 1;
    pub const MGMT_IO_MAX: u32 = 4096;

    /// `MGMT_IO` payload.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct MgmtIo {
        /// The caller's buffer.
        pub buffer: u64,
        pub len: u32,
        /// [`MGMT_READ`] or [`MGMT_WRITE`].
        pub op: u32,
        /// Out: bytes moved.
        pub done: u32,
        pub pad: u32,
    }
    assert_layout!(MgmtIo, 24; buffer @ 0, len @ 8, op @ 12, done @ 16);
    wire_struct!(
        MgmtIo,
        24,
        |r| MgmtIo {
            buffer: r.u64(),
            len: r.u32(),
            op: r.u32(),
            done: r.u32(),
            pad: r.u32()
        },
        |s, w| {
            w.put(&s.buffer.to_le_bytes());
            w.put(&s.len.to_le_bytes());
            w.put(&s.op.to_le_bytes());
            w.put(&s.done.to_le_bytes());
            w.put(&s.pad.to_le_bytes());
        }
    );

    /// `XEN_DOMCTL_max_mem` (Xen's number and payload, [`MaxMem`]): set the target domain's
    /// memory limit to `max_memkb` KiB (rounded down to pages). As in Xen, a limit below what
    /// the domain holds takes nothing away: it only refuses new allocations until the domain
    /// gives pages back. Needs `DOMAIN_CONTROL`; no such (live) domain: `-ESRCH`; a limit
    /// over `manifest::MAX_MEMORY_KIB`: `-EINVAL` (Bulkhead's bound; Xen clamps).
    pub const MAX_MEM: u32 = 11;

    /// `xen_domctl_max_mem`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct MaxMem {
        pub max_memkb: u64,
    }
    assert_layout!(MaxMem, 8; max_memkb @ 0);
    wire_struct!(MaxMem, 8, |r| MaxMem { max_memkb: r.u64() }, |s, w| {
        w.put(&s.max_memkb.to_le_bytes());
    });

    /// Bulkhead: read a console history: the header's `domain` names the domain whose
    /// console output (`console_io` writes, sanitised as they appear on the console, without
    /// the `(name)` prefix) to read, or [`crate::domid::DOMID_XEN`] for the hypervisor's own
    /// log (dmesg). Payload in/out = [`ConsoleRead`]. Each history is a bounded ring with a
    /// running byte offset: a read from `from` copies up to `len` bytes (at most
    /// [`CONSOLE_READ_MAX`]) and answers the count (also in `done`), the offset to continue
    /// from (`next`) and how many bytes between `from` and the oldest byte kept were
    /// dropped (`lost`). Never waits. Needs `DOMAIN_CONTROL`; no such domain (or already
    /// freed): `-ESRCH`; `from` beyond what was ever written, `len` too large, a non-zero
    /// pad: `-EINVAL`; the buffer not writable: `-EFAULT`.
    pub const CONSOLE_READ: u32 = 0x4248_0500;
    /// Most bytes one `CONSOLE_READ` copies.
    pub const CONSOLE_READ_MAX: u32 = 4096;

    /// `CONSOLE_READ` payload.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ConsoleRead {
        /// In: the offset to read from (bytes since the history began).
        pub from: u64,
        /// In: the caller's buffer.
        pub buffer: u64,
        pub len: u32,
        pub pad: u32,
        /// Out: the offset after the bytes copied (the next call's `from`).
        pub next: u64,
        /// Out: bytes dropped between `from` and the oldest byte still kept.
        pub lost: u64,
        /// Out: bytes copied.
        pub done: u32,
        pub pad1: u32,
    }
    assert_layout!(ConsoleRead, 48; from @ 0, buffer @ 8, len @ 16, pad @ 20, next @ 24,
        lost @ 32, done @ 40, pad1 @ 44);
    wire_struct!(
        ConsoleRead,
        48,
        |r| ConsoleRead {
            from: r.u64(),
            buffer: r.u64(),
            len: r.u32(),
            pad: r.u32(),
            next: r.u64(),
            lost: r.u64(),
            done: r.u32(),
            pad1: r.u32()
        },
        |s, w| {
            w.put(&s.from.to_le_bytes());
            w.put(&s.buffer.to_le_bytes());
            w.put(&s.len.to_le_bytes());
            w.put(&s.pad.to_le_bytes());
            w.put(&s.next.to_le_bytes());
            w.put(&s.lost.to_le_bytes());
            w.put(&s.done.to_le_bytes());
            w.put(&s.pad1.to_le_bytes());
        }
    );

    /// Bulkhead: give bytes to a domain's console input (the toolstack's side of `hvctl
    /// console`): the header's `domain` names the domain; payload in/out = [`ConsoleWrite`].
    /// Up to `len` bytes (at most [`CONSOLE_WRITE_MAX`]) are copied from `buffer` into the
    /// domain's bounded console input buffer ([`CONSOLE_INPUT_BYTES`]); the answer (also in
    /// `done`) is how many fit: fewer than `len` when the buffer is nearly full, and
    /// `-EAGAIN` when none fit at all (`len > 0`). Nothing is dropped silently and the call
    /// never waits. The domain reads its input with `console_io(CONSOLEIO_read)` and, if it
    /// bound `VIRQ_CONSOLE`, is sent that VIRQ when input arrives. Needs `DOMAIN_CONTROL`;
    /// no such live domain: `-ESRCH`; `len` too large or a non-zero pad: `-EINVAL`; the
    /// buffer not readable: `-EFAULT`.
    pub const CONSOLE_WRITE: u32 = 0x4248_0600;
    /// Most bytes one `CONSOLE_WRITE` copies.
    pub const CONSOLE_WRITE_MAX: u32 = 1024;
    /// Bytes of console input the hypervisor buffers per domain.
    pub const CONSOLE_INPUT_BYTES: usize = 1024;

    /// `CONSOLE_WRITE` payload.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ConsoleWrite {
        /// In: the caller's buffer.
        pub buffer: u64,
        pub len: u32,
        /// Out: bytes taken.
        pub done: u32,
        pub pad: u64,
    }
    assert_layout!(ConsoleWrite, 24; buffer @ 0, len @ 8, done @ 12, pad @ 16);
    wire_struct!(
        ConsoleWrite,
        24,
        |r| ConsoleWrite {
            buffer: r.u64(),
            len: r.u32(),
            done: r.u32(),
            pad: r.u64()
        },
        |s, w| {
            w.put(&s.buffer.to_le_bytes());
            w.put(&s.len.to_le_bytes());
            w.put(&s.done.to_le_bytes());
            w.put(&s.pad.to_le_bytes());
        }
    );

    /// Bulkhead: a domain's I/O counters (for `hvctl top`): the header's `domain` names the
    /// domain; payload out = [`DomainStats`]. All counters run from the domain's build and
    /// only grow. Needs `DOMAIN_CONTROL`; no such domain (or already freed): `-ESRCH`.
    pub const DOMAIN_STATS: u32 = 0x4248_0700;

    /// `DOMAIN_STATS` payload (out).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DomainStats {
        /// Event-channel notifications this domain sent (`EVTCHNOP_send` that succeeded).
        pub evtchn_sends: u64,
        /// Bytes moved by successful `GNTTABOP_copy` operations through grants this domain
        /// issued (its I/O: what a backend copied into or out of its pages).
        pub grant_copy_bytes: u64,
        /// Successful `GNTTABOP_copy` operations that this domain performed itself.
        pub grant_copies_done: u64,
        /// Successful `GNTTABOP_map_grant_ref` of grants this domain issued.
        pub grant_maps: u64,
        /// Bytes the domain wrote on its console (`console_io` write, before the rate limit).
        pub console_out_bytes: u64,
        /// Bytes given to its console input (`CONSOLE_WRITE`).
        pub console_in_bytes: u64,
    }
    assert_layout!(DomainStats, 48; evtchn_sends @ 0, grant_copy_bytes @ 8,
        grant_copies_done @ 16, grant_maps @ 24, console_out_bytes @ 32,
        console_in_bytes @ 40);
    wire_struct!(
        DomainStats,
        48,
        |r| DomainStats {
            evtchn_sends: r.u64(),
            grant_copy_bytes: r.u64(),
            grant_copies_done: r.u64(),
            grant_maps: r.u64(),
            console_out_bytes: r.u64(),
            console_in_bytes: r.u64()
        },
        |s, w| {
            w.put(&s.evtchn_sends.to_le_bytes());
            w.put(&s.grant_copy_bytes.to_le_bytes());
            w.put(&s.grant_copies_done.to_le_bytes());
            w.put(&s.grant_maps.to_le_bytes());
            w.put(&s.console_out_bytes.to_le_bytes());
            w.put(&s.console_in_bytes.to_le_bytes());
        }
    );

    impl CreateDomain {
        /// The name as text (up to the first NUL); `None` if not UTF-8.
        pub fn name(&self) -> Option<&str> {
            fixed_name(&self.name)
        }

        /// Set the name (at most 32 bytes are kept).
        pub fn set_name(&mut self, name: &str) {
            self.name = to_fixed_name(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::domctl::*;
    use super::*;

    fn round_trip<T: Wire + PartialEq + core::fmt::Debug>(v: T) {
        let mut buf = [0u8; 256];
        assert!(v.encode(&mut buf));
        assert_eq!(T::decode(&buf[..T::SIZE]).unwrap(), v);
        assert!(T::decode(&buf[..T::SIZE - 1]).is_none());
        assert!(!v.encode(&mut [0u8; 1]));
    }

    #[test]
    fn every_wire_struct_round_trips_and_refuses_short_buffers() {
        round_trip(SchedShutdown { reason: 3 });
        round_trip(SchedPoll {
            ports: 0x1000,
            nr_ports: 2,
            pad: 0,
            timeout: 99,
        });
        round_trip(SchedRemoteShutdown {
            domain_id: 4,
            pad: 0,
            reason: 1,
        });
        round_trip(VcpuSetSingleshotTimer {
            timeout_abs_ns: 5,
            flags: 1,
            pad: 0,
        });
        round_trip(VcpuRunstateInfo {
            state: -1,
            pad: 0,
            state_entry_time: 7,
            time: [1, 2, 3, 4],
        });
        round_trip(XenMemoryReservation {
            extent_start: 8,
            nr_extents: 9,
            extent_order: 1,
            mem_flags: 0,
            domid: 0x7FF0,
            pad: [0; 3],
        });
        round_trip(XenFeatureInfo {
            submap_idx: 0,
            submap: 0x1d2305,
        });
        round_trip(DomctlHeader {
            cmd: GETDOMAININFO,
            interface_version: INTERFACE_VERSION,
            domain: 3,
            pad: [0; 3],
        });
        let mut name = [0u8; 32];
        name[..3].copy_from_slice(b"abc");
        round_trip(DomainInfo {
            domid: 1,
            state: state::RUNNING,
            tot_pages: 10,
            name,
            ..Default::default()
        });
        round_trip(ListDomains {
            first_domain: 0,
            pad: 0,
            max_domains: 4,
            buffer: 0x2000,
        });
        let mut bd = BootDomain {
            index: 2,
            domid: 7,
            on_crash: 1,
            on_reboot: 2,
            nr_boot_domains: 4,
            ..Default::default()
        };
        bd.set_name("blkback");
        round_trip(bd);
        assert_eq!(bd.name(), Some("blkback"));
        let mut b = [0u8; 48];
        bd.encode(&mut b);
        assert_eq!((b[4], b[9], b[10], b[12], b[16]), (7, 2, 1, 4, b'b'));
        round_trip(MaxMem { max_memkb: 4096 });
        round_trip(ConsoleRead {
            from: 1,
            buffer: 2,
            len: 3,
            next: 4,
            lost: 5,
            done: 6,
            ..Default::default()
        });
        round_trip(ConsoleWrite {
            buffer: 1,
            len: 2,
            done: 3,
            pad: 0,
        });
        round_trip(DomainStats {
            evtchn_sends: 1,
            grant_copy_bytes: 2,
            grant_copies_done: 3,
            grant_maps: 4,
            console_out_bytes: 5,
            console_in_bytes: 6,
        });
        round_trip(SchedulerOp {
            sched_id: SCHEDULER_CREDIT,
            cmd: SCHEDOP_PUTINFO,
            weight: 512,
            cap: 50,
            pad: 0,
        });
    }

    #[test]
    fn encodings_put_fields_at_xen_offsets() {
        let mut b = [0u8; 32];
        XenMemoryReservation {
            domid: 0x7FF0,
            extent_order: 2,
            ..Default::default()
        }
        .encode(&mut b);
        assert_eq!(&b[24..26], &0x7FF0u16.to_le_bytes());
        assert_eq!(b[16], 2);
        let mut b = [0u8; 24];
        SchedPoll {
            timeout: 0x55,
            ..Default::default()
        }
        .encode(&mut b);
        assert_eq!(b[16], 0x55);
    }
}
