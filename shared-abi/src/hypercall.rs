//! Hypercall numbers (`xen/include/public/xen.h`, `__HYPERVISOR_*`) and the x86-64 PV calling
//! convention: number in RAX, arguments in RDI, RSI, RDX, R10, R8, result (or negative errno)
//! in RAX, entered with `syscall`.

pub const SET_TRAP_TABLE: u64 = 0;
pub const MMU_UPDATE: u64 = 1;
pub const SET_GDT: u64 = 2;
pub const STACK_SWITCH: u64 = 3;
pub const SET_CALLBACKS: u64 = 4;
pub const FPU_TASKSWITCH: u64 = 5;
pub const SCHED_OP_COMPAT: u64 = 6;
pub const PLATFORM_OP: u64 = 7;
pub const SET_DEBUGREG: u64 = 8;
pub const GET_DEBUGREG: u64 = 9;
pub const UPDATE_DESCRIPTOR: u64 = 10;
pub const MEMORY_OP: u64 = 12;
pub const MULTICALL: u64 = 13;
pub const UPDATE_VA_MAPPING: u64 = 14;
pub const SET_TIMER_OP: u64 = 15;
pub const EVENT_CHANNEL_OP_COMPAT: u64 = 16;
pub const XEN_VERSION: u64 = 17;
pub const CONSOLE_IO: u64 = 18;
pub const PHYSDEV_OP_COMPAT: u64 = 19;
pub const GRANT_TABLE_OP: u64 = 20;
pub const VM_ASSIST: u64 = 21;
pub const UPDATE_VA_MAPPING_OTHERDOMAIN: u64 = 22;
pub const IRET: u64 = 23;
pub const VCPU_OP: u64 = 24;
pub const SET_SEGMENT_BASE: u64 = 25;
pub const MMUEXT_OP: u64 = 26;
pub const XSM_OP: u64 = 27;
pub const NMI_OP: u64 = 28;
pub const SCHED_OP: u64 = 29;
pub const CALLBACK_OP: u64 = 30;
pub const EVENT_CHANNEL_OP: u64 = 32;
pub const PHYSDEV_OP: u64 = 33;
pub const HVM_OP: u64 = 34;
pub const SYSCTL: u64 = 35;
pub const DOMCTL: u64 = 36;
pub const KEXEC_OP: u64 = 37;
pub const ARGO_OP: u64 = 39;
pub const XENPMU_OP: u64 = 40;
pub const DM_OP: u64 = 41;
pub const HYPFS_OP: u64 = 42;
/// First architecture-specific hypercall (`__HYPERVISOR_arch_0`); 48..=55.
pub const ARCH_0: u64 = 48;

/// `console_io` sub-commands.
pub mod console_io {
    pub const WRITE: u64 = 0;
    pub const READ: u64 = 1;
}

/// `xen_version` sub-commands (`version.h`).
pub mod xen_version {
    pub const VERSION: u64 = 0;
    pub const EXTRAVERSION: u64 = 1;
    pub const COMPILE_INFO: u64 = 2;
    pub const CAPABILITIES: u64 = 3;
    pub const CHANGESET: u64 = 4;
    pub const PLATFORM_PARAMETERS: u64 = 5;
    pub const GET_FEATURES: u64 = 6;
    pub const PAGESIZE: u64 = 7;
    /// Length of the `extraversion` string buffer.
    pub const EXTRAVERSION_LEN: usize = 16;
    /// Length of the `capabilities` string buffer.
    pub const CAPABILITIES_LEN: usize = 1024;
}

/// `sched_op` sub-commands and shutdown reasons (`sched.h`).
pub mod sched_op {
    pub const YIELD: u64 = 0;
    pub const BLOCK: u64 = 1;
    pub const SHUTDOWN: u64 = 2;
    pub const POLL: u64 = 3;
    pub const REMOTE_SHUTDOWN: u64 = 4;
    pub const SHUTDOWN_CODE: u64 = 5;
    pub const WATCHDOG: u64 = 6;

    pub const SHUTDOWN_POWEROFF: u32 = 0;
    pub const SHUTDOWN_REBOOT: u32 = 1;
    pub const SHUTDOWN_SUSPEND: u32 = 2;
    pub const SHUTDOWN_CRASH: u32 = 3;
    pub const SHUTDOWN_WATCHDOG: u32 = 4;
    pub const SHUTDOWN_SOFT_RESET: u32 = 5;
}

/// `vcpu_op` sub-commands (`vcpu.h`).
pub mod vcpu_op {
    pub const INITIALISE: u64 = 0;
    pub const UP: u64 = 1;
    pub const DOWN: u64 = 2;
    pub const IS_UP: u64 = 3;
    pub const GET_RUNSTATE_INFO: u64 = 4;
    pub const REGISTER_RUNSTATE_MEMORY_AREA: u64 = 5;
    pub const SET_PERIODIC_TIMER: u64 = 6;
    pub const STOP_PERIODIC_TIMER: u64 = 7;
    pub const SET_SINGLESHOT_TIMER: u64 = 8;
    pub const STOP_SINGLESHOT_TIMER: u64 = 9;
    pub const REGISTER_VCPU_INFO: u64 = 10;

    pub const RUNSTATE_RUNNING: i32 = 0;
    pub const RUNSTATE_RUNNABLE: i32 = 1;
    pub const RUNSTATE_BLOCKED: i32 = 2;
    pub const RUNSTATE_OFFLINE: i32 = 3;

    /// `VCPU_SSHOTTMR_future`: fail with -ETIME if the deadline already passed.
    pub const SSHOTTMR_FUTURE: u32 = 1;
}

/// `memory_op` sub-commands (`memory.h`).
pub mod memory_op {
    pub const INCREASE_RESERVATION: u64 = 0;
    pub const DECREASE_RESERVATION: u64 = 1;
    pub const MAXIMUM_RAM_PAGE: u64 = 2;
    pub const CURRENT_RESERVATION: u64 = 3;
    pub const MAXIMUM_RESERVATION: u64 = 4;
    pub const POPULATE_PHYSMAP: u64 = 6;
    pub const ADD_TO_PHYSMAP: u64 = 7;
    pub const MEMORY_MAP: u64 = 9;
}

/// XENFEAT_* bit numbers (`features.h`, submap 0).
pub mod features {
    pub const WRITABLE_PAGE_TABLES: u32 = 0;
    pub const WRITABLE_DESCRIPTOR_TABLES: u32 = 1;
    pub const AUTO_TRANSLATED_PHYSMAP: u32 = 2;
    pub const SUPERVISOR_MODE_KERNEL: u32 = 3;
    pub const HVM_CALLBACK_VECTOR: u32 = 8;
    pub const HVM_SAFE_PVCLOCK: u32 = 9;
    pub const DOM0: u32 = 11;
}
