//! Device interrupts as events (Xen's pirq idea): each MSI-X entry a driver domain maps gets a
//! pirq number and a CPU vector of the hypervisor's; the domain binds the pirq to an event
//! channel; an interrupt on the vector sets that port pending.
//!
//! A storm limiter stands between the device and the domain: more than
//! [`StormLimit::max_per_window`] interrupts from one entry within a window mask that entry at
//! the device (MSI-X per-vector mask, so nothing is lost: the device latches pending) until a
//! quiet period has passed; the next timer tick or the owner's `PHYSDEVOP_eoi` after that
//! unmasks it. One device therefore costs the machine at most a bounded interrupt rate.
//!
//! Invariants: a vector belongs to at most one pirq; a pirq has exactly one owner, the domain
//! that mapped it; only the owner binds, unmaps, acknowledges or reads it.

use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::event_channel::EvtchnPort;

use crate::pci::PciAddress;

/// First CPU vector for device interrupts (below: exceptions, timer and IPIs).
pub const FIRST_VECTOR: u8 = 0x30;
/// Device vectors (and so pirqs) the hypervisor offers: `FIRST_VECTOR..FIRST_VECTOR + NR`.
pub const NR_VECTORS: usize = 64;

/// When an entry counts as storming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StormLimit {
    pub window_ns: u64,
    /// Interrupts allowed per window (more masks the entry).
    pub max_per_window: u32,
    /// How long a storming entry stays masked.
    pub quiet_ns: u64,
}

impl Default for StormLimit {
    /// 2,000 per 10 ms (200k/s per entry): far above what a driver doing useful work needs
    /// with interrupt coalescing, far below what would starve a CPU (~1–3 µs each).
    fn default() -> Self {
        StormLimit {
            window_ns: 10_000_000,
            max_per_window: 2_000,
            quiet_ns: 20_000_000,
        }
    }
}

/// One mapped MSI-X entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pirq {
    pub owner: DomId,
    pub address: PciAddress,
    pub entry: u16,
    pub vector: u8,
    /// The bound event channel, if any.
    pub port: Option<EvtchnPort>,
    pub stats: IrqStats,
    window_start: u64,
    window_count: u32,
    /// Masked by the limiter until this time.
    masked_until: Option<u64>,
}

/// Counters a domain may read about its own pirq.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqStats {
    pub raised: u64,
    pub delivered: u64,
    pub storms: u64,
    /// TSC at the hypervisor's entry for the last interrupt.
    pub last_tsc: u64,
}

/// What to do about an interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqAction {
    /// No pirq has this vector (stale or stray): nothing.
    Stray,
    /// Mapped but not bound to a port: counted, dropped.
    Unbound,
    /// Set `port` of `owner` pending (it must still be bound to `pirq`).
    Deliver {
        owner: DomId,
        port: EvtchnPort,
        pirq: u32,
    },
    /// The entry storms: mask it at the device now (this interrupt is still delivered when
    /// `deliver` is given) and report once.
    Storm {
        owner: DomId,
        address: PciAddress,
        entry: u16,
        deliver: Option<(EvtchnPort, u32)>,
    },
}

/// An entry to unmask at the device (its quiet period is over).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unmask {
    pub owner: DomId,
    pub address: PciAddress,
    pub entry: u16,
}

/// Every pirq, indexed by pirq number (= vector − [`FIRST_VECTOR`]).
pub struct IrqTable {
    slots: Vec<Option<Pirq>>,
    limit: StormLimit,
}

impl Default for IrqTable {
    fn default() -> Self {
        IrqTable::new(StormLimit::default())
    }
}

impl IrqTable {
    pub fn new(limit: StormLimit) -> Self {
        IrqTable {
            slots: alloc::vec![None; NR_VECTORS],
            limit,
        }
    }

    /// Map `entry` of `address` for `owner`: a new pirq and vector, or the pirq it already
    /// has for that entry (mapping twice is idempotent). `ENOSPC` when no vector is free.
    /// The caller programs the device and undoes this with [`IrqTable::unmap`] on failure.
    pub fn map(&mut self, owner: DomId, address: PciAddress, entry: u16) -> Result<u32, XenError> {
        if let Some(i) = self.slots.iter().position(|s| {
            s.is_some_and(|p| p.owner == owner && p.address == address && p.entry == entry)
        }) {
            return Ok(i as u32);
        }
        if self
            .slots
            .iter()
            .flatten()
            .any(|p| p.address == address && p.entry == entry)
        {
            // Another domain's mapping of the same entry: never shared.
            return Err(XenError::EBUSY);
        }
        let i = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(XenError::ENOSPC)?;
        self.slots[i] = Some(Pirq {
            owner,
            address,
            entry,
            vector: FIRST_VECTOR + i as u8,
            port: None,
            stats: IrqStats::default(),
            window_start: 0,
            window_count: 0,
            masked_until: None,
        });
        Ok(i as u32)
    }

    /// Whether `owner` already mapped `entry` of `address`.
    pub fn mapped_entry(&self, owner: DomId, address: PciAddress, entry: u16) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|p| p.owner == owner && p.address == address && p.entry == entry)
    }

    /// `owner`'s pirq, or `EINVAL` (unmapped, out of range, or another domain's).
    pub fn get(&self, owner: DomId, pirq: u32) -> Result<&Pirq, XenError> {
        self.slots
            .get(pirq as usize)
            .and_then(Option::as_ref)
            .filter(|p| p.owner == owner)
            .ok_or(XenError::EINVAL)
    }

    fn get_mut(&mut self, owner: DomId, pirq: u32) -> Result<&mut Pirq, XenError> {
        self.slots
            .get_mut(pirq as usize)
            .and_then(Option::as_mut)
            .filter(|p| p.owner == owner)
            .ok_or(XenError::EINVAL)
    }

    /// Forget `owner`'s pirq; returns it (the caller masks the entry, closes its port).
    pub fn unmap(&mut self, owner: DomId, pirq: u32) -> Result<Pirq, XenError> {
        self.get(owner, pirq)?;
        self.slots
            .get_mut(pirq as usize)
            .and_then(Option::take)
            .ok_or(XenError::EINVAL)
    }

    /// Record that `port` now receives `owner`'s pirq.
    pub fn bind(&mut self, owner: DomId, pirq: u32, port: EvtchnPort) -> Result<(), XenError> {
        self.get_mut(owner, pirq)?.port = Some(port);
        Ok(())
    }

    /// The pirq a vector belongs to.
    pub fn pirq_of_vector(vector: u8) -> Option<u32> {
        let i = vector.checked_sub(FIRST_VECTOR)? as usize;
        (i < NR_VECTORS).then_some(i as u32)
    }

    /// An interrupt arrived on `vector` at `now` (ns) and `tsc`.
    pub fn interrupt(&mut self, vector: u8, now: u64, tsc: u64) -> IrqAction {
        let limit = self.limit;
        let Some(p) = Self::pirq_of_vector(vector)
            .and_then(|i| self.slots.get_mut(i as usize))
            .and_then(Option::as_mut)
        else {
            return IrqAction::Stray;
        };
        let pirq = u32::from(p.vector - FIRST_VECTOR);
        p.stats.raised += 1;
        p.stats.last_tsc = tsc;
        if now.saturating_sub(p.window_start) >= limit.window_ns {
            p.window_start = now;
            p.window_count = 0;
        }
        p.window_count = p.window_count.saturating_add(1);
        let deliver = p.port.map(|port| (port, pirq));
        if deliver.is_some() {
            p.stats.delivered += 1;
        }
        if p.window_count > limit.max_per_window && p.masked_until.is_none() {
            p.stats.storms += 1;
            p.masked_until = Some(now.saturating_add(limit.quiet_ns));
            return IrqAction::Storm {
                owner: p.owner,
                address: p.address,
                entry: p.entry,
                deliver,
            };
        }
        match deliver {
            Some((port, pirq)) => IrqAction::Deliver {
                owner: p.owner,
                port,
                pirq,
            },
            None => IrqAction::Unbound,
        }
    }

    /// Entries whose quiet period has passed by `now`: unmask them at the device.
    pub fn due_unmasks(&mut self, now: u64) -> Vec<Unmask> {
        let mut out = Vec::new();
        for p in self.slots.iter_mut().flatten() {
            if p.masked_until.is_some_and(|t| now >= t) {
                p.masked_until = None;
                p.window_start = now;
                p.window_count = 0;
                out.push(Unmask {
                    owner: p.owner,
                    address: p.address,
                    entry: p.entry,
                });
            }
        }
        out
    }

    /// `PHYSDEVOP_eoi` from the owner: the entry to unmask if the limiter masked it and its
    /// quiet period is over. `EINVAL` for a pirq it does not hold.
    pub fn eoi(&mut self, owner: DomId, pirq: u32, now: u64) -> Result<Option<Unmask>, XenError> {
        let p = self.get_mut(owner, pirq)?;
        if p.masked_until.is_some_and(|t| now >= t) {
            p.masked_until = None;
            p.window_start = now;
            p.window_count = 0;
            return Ok(Some(Unmask {
                owner,
                address: p.address,
                entry: p.entry,
            }));
        }
        Ok(None)
    }

    /// The earliest time a masked entry may be unmasked (for the timer).
    pub fn next_unmask(&self) -> Option<u64> {
        self.slots
            .iter()
            .flatten()
            .filter_map(|p| p.masked_until)
            .min()
    }

    /// `dom` is dying: every pirq it holds goes (its devices are quiesced by the caller).
    pub fn release_domain(&mut self, dom: DomId) -> Vec<Pirq> {
        let mut out = Vec::new();
        for s in &mut self.slots {
            if s.is_some_and(|p| p.owner == dom)
                && let Some(p) = s.take()
            {
                out.push(p);
            }
        }
        out
    }

    /// Pirqs mapped now (for reports and tests).
    pub fn mapped(&self) -> usize {
        self.slots.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(dev: u8) -> PciAddress {
        PciAddress {
            segment: 0,
            bus: 0,
            device: dev,
            function: 0,
        }
    }

    #[test]
    fn mapping_is_per_entry_idempotent_and_never_shared() {
        let mut t = IrqTable::default();
        let a = t.map(3, addr(3), 0).unwrap();
        let b = t.map(3, addr(3), 1).unwrap();
        assert_ne!(a, b);
        assert_eq!(t.map(3, addr(3), 0), Ok(a));
        assert_eq!(t.map(4, addr(3), 0), Err(XenError::EBUSY));
        assert_eq!(t.get(3, a).unwrap().vector, FIRST_VECTOR + a as u8);
        assert_eq!(t.get(4, a).err(), Some(XenError::EINVAL));
        assert_eq!(t.get(3, 9999).err(), Some(XenError::EINVAL));
        assert_eq!(t.unmap(4, a).err(), Some(XenError::EINVAL));
        assert_eq!(t.unmap(3, a).unwrap().entry, 0);
        assert_eq!(t.mapped(), 1);
    }

    #[test]
    fn vectors_run_out_with_enospc_and_come_back() {
        let mut t = IrqTable::default();
        for e in 0..NR_VECTORS as u16 {
            t.map(1, addr(3), e).unwrap();
        }
        assert_eq!(t.map(1, addr(4), 0), Err(XenError::ENOSPC));
        assert_eq!(t.release_domain(1).len(), NR_VECTORS);
        assert_eq!(t.mapped(), 0);
        assert!(t.map(2, addr(4), 0).is_ok());
    }

    #[test]
    fn interrupts_reach_the_bound_port_only() {
        let mut t = IrqTable::default();
        let p = t.map(3, addr(3), 0).unwrap();
        let v = t.get(3, p).unwrap().vector;
        assert_eq!(t.interrupt(v, 1, 100), IrqAction::Unbound);
        assert_eq!(t.bind(4, p, 5), Err(XenError::EINVAL));
        t.bind(3, p, 5).unwrap();
        assert_eq!(
            t.interrupt(v, 2, 200),
            IrqAction::Deliver {
                owner: 3,
                port: 5,
                pirq: p
            }
        );
        let s = t.get(3, p).unwrap().stats;
        assert_eq!((s.raised, s.delivered, s.last_tsc), (2, 1, 200));
        assert_eq!(t.interrupt(FIRST_VECTOR + 40, 3, 0), IrqAction::Stray);
        assert_eq!(t.interrupt(0x20, 3, 0), IrqAction::Stray);
        assert_eq!(t.interrupt(0xff, 3, 0), IrqAction::Stray);
    }

    #[test]
    fn a_storm_is_masked_once_then_unmasked_after_quiet() {
        let limit = StormLimit {
            window_ns: 1000,
            max_per_window: 10,
            quiet_ns: 5000,
        };
        let mut t = IrqTable::new(limit);
        let p = t.map(3, addr(3), 2).unwrap();
        t.bind(3, p, 7).unwrap();
        let v = t.get(3, p).unwrap().vector;
        for i in 0..10 {
            assert!(matches!(t.interrupt(v, i, 0), IrqAction::Deliver { .. }));
        }
        assert_eq!(
            t.interrupt(v, 10, 0),
            IrqAction::Storm {
                owner: 3,
                address: addr(3),
                entry: 2,
                deliver: Some((7, p))
            }
        );
        // Already masked: interrupts latched before the mask still arrive, counted, no second report.
        assert!(matches!(t.interrupt(v, 11, 0), IrqAction::Deliver { .. }));
        assert_eq!(t.get(3, p).unwrap().stats.storms, 1);
        assert_eq!(t.next_unmask(), Some(5010));
        assert!(t.due_unmasks(5009).is_empty());
        assert_eq!(t.eoi(3, p, 5009), Ok(None));
        assert_eq!(t.eoi(4, p, 6000), Err(XenError::EINVAL));
        assert_eq!(
            t.eoi(3, p, 5010),
            Ok(Some(Unmask {
                owner: 3,
                address: addr(3),
                entry: 2
            }))
        );
        assert!(t.due_unmasks(9999).is_empty());
        // A slow, steady rate never trips it.
        for i in 0..100u64 {
            assert!(matches!(
                t.interrupt(v, 10_000 + i * 200, 0),
                IrqAction::Deliver { .. }
            ));
        }
    }

    #[test]
    fn timer_unmasks_due_entries() {
        let limit = StormLimit {
            window_ns: 1000,
            max_per_window: 1,
            quiet_ns: 100,
        };
        let mut t = IrqTable::new(limit);
        let p = t.map(3, addr(3), 0).unwrap();
        let v = t.get(3, p).unwrap().vector;
        t.interrupt(v, 0, 0);
        assert!(matches!(
            t.interrupt(v, 1, 0),
            IrqAction::Storm { deliver: None, .. }
        ));
        assert_eq!(t.due_unmasks(101).len(), 1);
        assert_eq!(t.next_unmask(), None);
    }
}
