//! MSI-X interrupts as event channels (Xen's pirq model).
//!
//! `PHYSDEVOP_map_pirq` asks the hypervisor to program one MSI-X table entry of one of this
//! domain's functions with a CPU vector of its own and names it by a pirq; `EVTCHNOP_bind_pirq`
//! connects the pirq to a new event-channel port. From then on every interrupt the entry raises
//! sets that port pending (the hypervisor acknowledges the local APIC itself; MSI-X is edge
//! triggered, so there is nothing to acknowledge at the interrupt controller). An interrupt
//! storm makes the hypervisor mask the entry for a while; [`Interrupt::eoi`] asks for it back.
//! The table itself stays the hypervisor's: `MAP_BAR` refuses its pages.

use shared_abi::errno::XenError;
pub use shared_abi::pci::IrqStatsOp as IrqStats;

use super::PciAddress;
use crate::event::Waiter;
use crate::hypercall;

/// One bound MSI-X entry: its pirq and the event-channel port it fires.
#[derive(Debug)]
pub struct Interrupt {
    pirq: u32,
    port: u32,
    entry: u16,
}

impl Interrupt {
    /// `map_pirq` for `entry` of `dev`, then `bind_pirq`. If binding fails the pirq is
    /// unmapped again.
    pub fn bind(dev: PciAddress, entry: u16) -> Result<Interrupt, XenError> {
        let pirq = hypercall::map_pirq(dev, entry)?;
        match hypercall::bind_pirq(pirq) {
            Ok(port) => Ok(Interrupt { pirq, port, entry }),
            Err(e) => {
                let _ = hypercall::unmap_pirq(pirq);
                Err(e)
            }
        }
    }

    pub fn pirq(&self) -> u32 {
        self.pirq
    }

    /// The event-channel port the interrupt fires.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The MSI-X table entry (the vector number a device like virtio is told to use).
    pub fn entry(&self) -> u16 {
        self.entry
    }

    /// Raised / delivered / storm counts and the TSC of the last interrupt.
    pub fn stats(&self) -> Result<IrqStats, XenError> {
        hypercall::irq_stats(self.pirq)
    }

    /// Ask for the entry back if the storm limiter masked it (a no-op otherwise).
    pub fn eoi(&self) -> Result<(), XenError> {
        hypercall::eoi(self.pirq)
    }

    /// Block until the interrupt fires (consuming the event).
    pub fn wait(&self, w: &mut Waiter) -> Result<(), XenError> {
        w.wait(self.port)
    }

    /// Block until the interrupt fires or system time `deadline_ns`: whether it fired.
    pub fn wait_until(&self, w: &mut Waiter, deadline_ns: u64) -> Result<bool, XenError> {
        w.wait_until(self.port, deadline_ns)
    }

    /// Give the entry back: the hypervisor masks it, closes the port and frees the vector.
    pub fn unbind(self) -> Result<(), XenError> {
        hypercall::unmap_pirq(self.pirq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::{MOCK, TEST_LOCK};
    use shared_abi::hypercall as hc;

    fn refuse_bind(nr: u64, a: [u64; 5]) -> i64 {
        match (nr, a[0]) {
            (hc::PHYSDEV_OP, shared_abi::pci::physdev::MAP_PIRQ) => {
                // SAFETY: map_pirq passes its live 40-byte argument.
                let b = unsafe { core::slice::from_raw_parts_mut(a[1] as *mut u8, 40) };
                b[12..16].copy_from_slice(&9i32.to_le_bytes());
                0
            }
            (hc::PHYSDEV_OP, shared_abi::pci::physdev::UNMAP_PIRQ) => {
                UNMAPPED.store(true, core::sync::atomic::Ordering::SeqCst);
                0
            }
            (hc::PHYSDEV_OP, shared_abi::pci::physdev::IRQ_STATS) => {
                // SAFETY: irq_stats passes its live 40-byte argument.
                let b = unsafe { core::slice::from_raw_parts_mut(a[1] as *mut u8, 40) };
                b[8..16].copy_from_slice(&5u64.to_le_bytes());
                b[32..40].copy_from_slice(&1234u64.to_le_bytes());
                0
            }
            _ => XenError::ENOSPC.as_ret(),
        }
    }

    static UNMAPPED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

    #[test]
    fn a_failed_bind_unmaps_the_pirq_again() {
        let _g = TEST_LOCK.lock();
        *MOCK.lock() = Some(refuse_bind);
        let dev = PciAddress {
            segment: 0,
            bus: 0,
            devfn: 0x18,
        };
        assert_eq!(Interrupt::bind(dev, 0).map(|_| ()), Err(XenError::ENOSPC));
        assert!(UNMAPPED.load(core::sync::atomic::Ordering::SeqCst));
        let i = Interrupt {
            pirq: 9,
            port: 3,
            entry: 0,
        };
        let s = i.stats().unwrap();
        assert_eq!((s.pirq, s.raised, s.last_tsc), (9, 5, 1234));
        *MOCK.lock() = None;
        assert_eq!(i.eoi(), Err(XenError::ENOSYS));
    }
}
