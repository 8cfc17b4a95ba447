//! The guest's side of Xen's PV shutdown protocol.
//!
//! A toolstack asks a guest to stop by writing a request word ("poweroff", "reboot",
//! "halt", …) to `control/shutdown` in the guest's home. Linux advertises the requests it
//! honours as `control/feature-<word>` = "1" and, when one arrives, acknowledges it by
//! writing "" back before acting. Bulkhead's ctl asks only guests that advertised and stops
//! the others through the hypervisor, so a guest calls [`advertise`] once it watches for
//! requests, then [`take_request`] on its xenstore events or timer.
//!
//! The value is the guest's own node but anything may be in it: unknown words are ignored
//! (and left, as Linux leaves them), nothing here panics.

use alloc::format;

use shared_abi::hypercall::sched_op;
use shared_abi::xenbus::{Store, StoreError};

/// A shutdown request a guest honours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownRequest {
    Poweroff,
    Reboot,
}

impl ShutdownRequest {
    /// The word in `control/shutdown` and in `control/feature-<word>`.
    pub fn word(self) -> &'static str {
        match self {
            ShutdownRequest::Poweroff => "poweroff",
            ShutdownRequest::Reboot => "reboot",
        }
    }

    /// The `SCHEDOP_shutdown` reason to stop with (so the toolstack applies `on_poweroff`
    /// or `on_reboot`).
    pub fn reason(self) -> u32 {
        match self {
            ShutdownRequest::Poweroff => sched_op::SHUTDOWN_POWEROFF,
            ShutdownRequest::Reboot => sched_op::SHUTDOWN_REBOOT,
        }
    }

    fn parse(word: &str) -> Option<Self> {
        match word {
            "poweroff" => Some(ShutdownRequest::Poweroff),
            // "halt" is Linux's other spelling of stopping for good.
            "halt" => Some(ShutdownRequest::Poweroff),
            "reboot" => Some(ShutdownRequest::Reboot),
            _ => None,
        }
    }
}

/// Tell the toolstack this guest honours poweroff and reboot requests (`home` is
/// `/local/domain/<me>`).
pub fn advertise<S: Store>(store: &mut S, home: &str) -> Result<(), StoreError> {
    for r in [ShutdownRequest::Poweroff, ShutdownRequest::Reboot] {
        store.write(&format!("{home}/control/feature-{}", r.word()), "1")?;
    }
    Ok(())
}

/// A pending request, acknowledged (the node set back to ""), or `None`. The read and
/// the acknowledgement are two operations: a second request written between them is
/// overwritten, which is harmless because the guest is stopping for the first one.
pub fn take_request<S: Store>(
    store: &mut S,
    home: &str,
) -> Result<Option<ShutdownRequest>, StoreError> {
    let node = format!("{home}/control/shutdown");
    let Some(word) = store.read(&node)? else {
        return Ok(None);
    };
    let Some(request) = ShutdownRequest::parse(word.trim_end_matches('\0')) else {
        return Ok(None);
    };
    store.write(&node, "")?;
    Ok(Some(request))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_abi::xenbus::MemStore;

    const HOME: &str = "/local/domain/7";

    #[test]
    fn advertises_both_features() {
        let mut s = MemStore::default();
        advertise(&mut s, HOME).unwrap();
        assert_eq!(s.get("/local/domain/7/control/feature-poweroff"), Some("1"));
        assert_eq!(s.get("/local/domain/7/control/feature-reboot"), Some("1"));
    }

    #[test]
    fn a_request_is_taken_once_and_acknowledged() {
        let mut s = MemStore::default();
        assert_eq!(take_request(&mut s, HOME), Ok(None), "no node");
        s.set("/local/domain/7/control/shutdown", "");
        assert_eq!(take_request(&mut s, HOME), Ok(None), "empty node");
        s.set("/local/domain/7/control/shutdown", "reboot");
        let r = take_request(&mut s, HOME).unwrap();
        assert_eq!(r, Some(ShutdownRequest::Reboot));
        assert_eq!(
            r.map(ShutdownRequest::reason),
            Some(sched_op::SHUTDOWN_REBOOT)
        );
        assert_eq!(s.get("/local/domain/7/control/shutdown"), Some(""));
        assert_eq!(take_request(&mut s, HOME), Ok(None), "taken once");
        s.set("/local/domain/7/control/shutdown", "halt");
        assert_eq!(
            take_request(&mut s, HOME),
            Ok(Some(ShutdownRequest::Poweroff))
        );
    }

    #[test]
    fn unknown_words_are_left_alone() {
        let mut s = MemStore::default();
        for junk in ["suspend", "POWEROFF", "poweroff now", "\u{fffd}"] {
            s.set("/local/domain/7/control/shutdown", junk);
            assert_eq!(take_request(&mut s, HOME), Ok(None), "{junk:?}");
            assert_eq!(s.get("/local/domain/7/control/shutdown"), Some(junk));
        }
    }
}
