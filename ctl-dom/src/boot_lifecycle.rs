//! Boot-domain lifecycle policies: what the ctl-dom domain does when a boot domain dies.
//!
//! Boot domains are described by the boot image's manifest (with `on_poweroff`,
//! `on_reboot`, `on_crash`), built by the hypervisor, and rebuilt by it on request
//! (`domctl REBUILD_BOOT_DOMAIN`: same builder, same spec, the ELF the image still holds,
//! devices and xenstore port handed again). This module keeps one [`BootRecord`] per
//! manifest entry and, on every `VIRQ_DOM_EXC`, compares the domain list with them:
//! a record whose current domain is shut down, dying, dead or gone is handled once, by the
//! policy for the shutdown reason the hypervisor reports (poweroff, reboot, anything else
//! counts as a crash):
//!
//! - `destroy`: destroyed (if the hypervisor kept it), and the record is done;
//! - `restart`: rebuilt under a new id, unless the [`RestartLimit`] says it restarted too
//!   often lately (a crash loop): then it is left destroyed, with a message saying so;
//! - `preserve`: left as it is (shut down, not scheduled, memory kept) for inspection; the
//!   record is done.
//!
//! Run-time domains ([`crate::Toolstack`]) keep their own policies in their configs; this is
//! the same decision for domains the toolstack did not create and whose kernel it does not
//! hold, so the restart goes through the hypervisor's rebuild, not `Platform::create`.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use shared_abi::DomId;
use shared_abi::capability::Capabilities;
use shared_abi::domain_config::LifecycleAction;
use shared_abi::errno::XenError;
use shared_abi::hypercall_args::domctl::{BOOT_NO_DOMAIN, BootDomain, DomainInfo, state};

use crate::shutdown;

/// What the lifecycle code needs from the hypervisor.
pub trait BootPlatform {
    /// Every domain the hypervisor lists (dead ones included while it keeps them).
    fn list(&mut self) -> Result<Vec<DomainInfo>, XenError>;
    /// Rebuild manifest entry `index`; the new domain id.
    fn rebuild(&mut self, index: u32) -> Result<DomId, XenError>;
    fn destroy(&mut self, domid: DomId) -> Result<(), XenError>;
    /// Monotonic time, ns.
    fn now_ns(&mut self) -> u64;
}

/// At most `max` restarts of one boot domain within `window_ns`; one more death in the
/// window leaves it destroyed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartLimit {
    pub max: u32,
    pub window_ns: u64,
}

impl Default for RestartLimit {
    /// Three restarts a minute.
    fn default() -> Self {
        RestartLimit {
            max: 3,
            window_ns: 60_000_000_000,
        }
    }
}

/// One manifest entry as ctl-dom follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootRecord {
    pub index: u32,
    pub name: String,
    /// Its current domain ([`BOOT_NO_DOMAIN`]: none).
    pub domid: DomId,
    pub on_poweroff: LifecycleAction,
    pub on_reboot: LifecycleAction,
    pub on_crash: LifecycleAction,
    /// Restarts so far.
    pub restarts: u32,
    /// When the restarts inside the limit's window happened.
    recent: VecDeque<u64>,
    /// Its current domain's death was handled (nothing more to do until a rebuild).
    done: bool,
    /// Left shut down for inspection.
    pub preserved: bool,
}

impl BootRecord {
    /// From a `BOOT_DOMAIN_INFO` answer; `None` if its name or a policy code is garbled.
    pub fn from_info(b: &BootDomain) -> Option<BootRecord> {
        Some(BootRecord {
            index: b.index,
            name: String::from(b.name()?),
            domid: b.domid,
            on_poweroff: LifecycleAction::from_code(b.on_poweroff)?,
            on_reboot: LifecycleAction::from_code(b.on_reboot)?,
            on_crash: LifecycleAction::from_code(b.on_crash)?,
            restarts: 0,
            recent: VecDeque::new(),
            done: b.domid == BOOT_NO_DOMAIN,
            preserved: false,
        })
    }

    /// The policy for a `SHUTDOWN_*` reason (suspend, watchdog and unknown: crash).
    pub fn action_for(&self, reason: u32) -> LifecycleAction {
        match reason {
            shutdown::POWEROFF => self.on_poweroff,
            shutdown::REBOOT => self.on_reboot,
            _ => self.on_crash,
        }
    }
}

/// Xen's name of a shutdown reason.
pub fn reason_name(reason: u32) -> &'static str {
    match reason {
        shutdown::POWEROFF => "poweroff",
        shutdown::REBOOT => "reboot",
        shutdown::SUSPEND => "suspend",
        shutdown::CRASH => "crash",
        4 => "watchdog",
        5 => "soft_reset",
        _ => "unknown",
    }
}

/// What happened to one boot domain (each prints as one console line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Restarted {
        name: String,
        old: DomId,
        new: DomId,
        reason: u32,
        restart: u32,
    },
    Destroyed {
        name: String,
        domid: DomId,
        reason: u32,
    },
    Preserved {
        name: String,
        domid: DomId,
        reason: u32,
    },
    /// A crash loop: `deaths` restarts within the window already; left destroyed.
    RestartLimit {
        name: String,
        domid: DomId,
        restarts: u32,
        limit: RestartLimit,
    },
    RestartFailed {
        name: String,
        domid: DomId,
        error: XenError,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Restarted {
                name,
                old,
                new,
                reason,
                restart,
            } => write!(
                f,
                "ctl: restarted {name} as domain {new} (restart #{restart}; domain {old} died: {})",
                reason_name(*reason)
            ),
            Outcome::Destroyed {
                name,
                domid,
                reason,
            } => write!(
                f,
                "ctl: {name} (domain {domid}) died: {}; destroyed, as its policy says",
                reason_name(*reason)
            ),
            Outcome::Preserved {
                name,
                domid,
                reason,
            } => write!(
                f,
                "ctl: {name} (domain {domid}) died: {}; preserved (shut down, memory kept) for inspection",
                reason_name(*reason)
            ),
            Outcome::RestartLimit {
                name,
                domid,
                restarts,
                limit,
            } => write!(
                f,
                "ctl: {name} (domain {domid}) died again after {restarts} restarts within {} ms: \
                 restart limit ({} per {} ms) reached; leaving it destroyed",
                limit.window_ns / 1_000_000,
                limit.max,
                limit.window_ns / 1_000_000
            ),
            Outcome::RestartFailed { name, domid, error } => write!(
                f,
                "ctl: {name} (domain {domid}) could not be restarted: {error:?}; left destroyed"
            ),
        }
    }
}

fn alive(s: u32) -> bool {
    matches!(s, state::BUILDING | state::RUNNING | state::PAUSED)
}

/// Every boot domain's record and the restart limit.
#[derive(Clone, Debug)]
pub struct BootLifecycle {
    pub records: Vec<BootRecord>,
    pub limit: RestartLimit,
    /// ctl-dom itself (never acted on).
    pub me: DomId,
}

impl BootLifecycle {
    pub fn new(records: Vec<BootRecord>, limit: RestartLimit, me: DomId) -> Self {
        BootLifecycle { records, limit, me }
    }

    /// Apply the policy of every boot domain whose current domain died since the last call.
    pub fn scan(&mut self, p: &mut impl BootPlatform) -> Result<Vec<Outcome>, XenError> {
        let list = p.list()?;
        let mut out = Vec::new();
        for i in 0..self.records.len() {
            let r = &self.records[i];
            if r.done || r.domid == self.me || r.domid == BOOT_NO_DOMAIN {
                continue;
            }
            let info = list.iter().find(|d| d.domid == r.domid);
            if info.is_some_and(|d| alive(d.state)) {
                continue;
            }
            // Gone from the list: destroyed by someone; its reason is lost, call it a crash.
            let (reason, kept) = match info {
                Some(d) => (d.shutdown_reason, d.state == state::SHUTDOWN),
                None => (shutdown::CRASH, false),
            };
            out.push(self.handle(p, i, reason, kept));
        }
        Ok(out)
    }

    fn handle(&mut self, p: &mut impl BootPlatform, i: usize, reason: u32, kept: bool) -> Outcome {
        let now = p.now_ns();
        let limit = self.limit;
        let r = &mut self.records[i];
        let domid = r.domid;
        let name = r.name.clone();
        r.done = true;
        match r.action_for(reason) {
            LifecycleAction::Preserve if kept => {
                r.preserved = true;
                Outcome::Preserved {
                    name,
                    domid,
                    reason,
                }
            }
            // The hypervisor freed it already (a fault always is): nothing to keep.
            LifecycleAction::Destroy | LifecycleAction::Preserve => {
                if kept {
                    let _ = p.destroy(domid);
                }
                Outcome::Destroyed {
                    name,
                    domid,
                    reason,
                }
            }
            LifecycleAction::Restart => {
                while r
                    .recent
                    .front()
                    .is_some_and(|&t| now.saturating_sub(t) > limit.window_ns)
                {
                    r.recent.pop_front();
                }
                if r.recent.len() as u32 >= limit.max {
                    if kept {
                        let _ = p.destroy(domid);
                    }
                    return Outcome::RestartLimit {
                        name,
                        domid,
                        restarts: r.recent.len() as u32,
                        limit,
                    };
                }
                match p.rebuild(r.index) {
                    Ok(new) => {
                        r.domid = new;
                        r.done = false;
                        r.preserved = false;
                        r.restarts = r.restarts.saturating_add(1);
                        r.recent.push_back(now);
                        Outcome::Restarted {
                            name,
                            old: domid,
                            new,
                            reason,
                            restart: r.restarts,
                        }
                    }
                    Err(error) => {
                        if kept {
                            let _ = p.destroy(domid);
                        }
                        Outcome::RestartFailed { name, domid, error }
                    }
                }
            }
        }
    }

    /// Domains kept by `preserve`.
    pub fn preserved(&self) -> Vec<DomId> {
        self.records
            .iter()
            .filter(|r| r.preserved)
            .map(|r| r.domid)
            .collect()
    }

    /// Whether every boot domain that died in `list` has been handled (a death after the
    /// last [`BootLifecycle::scan`] is not: scan again before deciding anything on it).
    pub fn settled(&self, list: &[DomainInfo]) -> bool {
        self.records.iter().all(|r| {
            r.done
                || r.domid == self.me
                || r.domid == BOOT_NO_DOMAIN
                || list.iter().any(|d| d.domid == r.domid && alive(d.state))
        })
    }

    /// Whether any domain other than ctl-dom and the xenstore domain is alive in `list`
    /// (what `exit_when_idle` waits for).
    pub fn others_alive(&self, list: &[DomainInfo]) -> bool {
        list.iter().any(|d| {
            d.domid != self.me
                && alive(d.state)
                && !Capabilities::from_bits_retain(d.capabilities)
                    .contains(Capabilities::XENSTORE_SERVICE)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec;

    /// Domains by id: (state, shutdown reason, caps); rebuilds get the next id.
    struct Fake {
        doms: BTreeMap<DomId, (u32, u32, u64)>,
        next: DomId,
        now: u64,
        rebuilt: Vec<u32>,
        destroyed: Vec<DomId>,
        refuse: Option<XenError>,
    }

    impl Fake {
        fn new() -> Fake {
            let mut doms = BTreeMap::new();
            doms.insert(
                1,
                (state::RUNNING, 0, Capabilities::XENSTORE_SERVICE.bits()),
            );
            doms.insert(2, (state::RUNNING, 0, Capabilities::DOMAIN_CONTROL.bits()));
            doms.insert(3, (state::RUNNING, 0, 0));
            Fake {
                doms,
                next: 4,
                now: 0,
                rebuilt: Vec::new(),
                destroyed: Vec::new(),
                refuse: None,
            }
        }

        fn die(&mut self, d: DomId, st: u32, reason: u32) {
            if let Some(x) = self.doms.get_mut(&d) {
                x.0 = st;
                x.1 = reason;
            }
        }
    }

    impl BootPlatform for Fake {
        fn list(&mut self) -> Result<Vec<DomainInfo>, XenError> {
            Ok(self
                .doms
                .iter()
                .map(
                    |(&domid, &(state, shutdown_reason, capabilities))| DomainInfo {
                        domid,
                        state,
                        shutdown_reason,
                        capabilities,
                        ..Default::default()
                    },
                )
                .collect())
        }
        fn rebuild(&mut self, index: u32) -> Result<DomId, XenError> {
            if let Some(e) = self.refuse {
                return Err(e);
            }
            self.rebuilt.push(index);
            let id = self.next;
            self.next += 1;
            self.doms.insert(id, (state::RUNNING, 0, 0));
            Ok(id)
        }
        fn destroy(&mut self, domid: DomId) -> Result<(), XenError> {
            self.destroyed.push(domid);
            self.die(domid, state::DEAD, 0);
            Ok(())
        }
        fn now_ns(&mut self) -> u64 {
            self.now
        }
    }

    fn record(index: u32, name: &str, domid: DomId, on_crash: LifecycleAction) -> BootRecord {
        let mut b = BootDomain {
            index,
            domid,
            on_crash: on_crash.code(),
            ..Default::default()
        };
        b.set_name(name);
        BootRecord::from_info(&b).unwrap()
    }

    fn system(on_crash: LifecycleAction) -> BootLifecycle {
        BootLifecycle::new(
            vec![
                record(0, "xenstore", 1, LifecycleAction::Destroy),
                record(1, "ctl", 2, LifecycleAction::Destroy),
                record(2, "blk", 3, on_crash),
            ],
            RestartLimit::default(),
            2,
        )
    }

    #[test]
    fn nothing_happens_while_everyone_runs() {
        let mut f = Fake::new();
        let mut l = system(LifecycleAction::Restart);
        assert!(l.scan(&mut f).unwrap().is_empty());
        assert!(f.rebuilt.is_empty());
    }

    #[test]
    fn a_crash_with_restart_rebuilds_under_a_new_id_and_follows_it() {
        let mut f = Fake::new();
        let mut l = system(LifecycleAction::Restart);
        f.die(3, state::DEAD, shutdown::CRASH);
        let out = l.scan(&mut f).unwrap();
        assert_eq!(
            out,
            vec![Outcome::Restarted {
                name: "blk".into(),
                old: 3,
                new: 4,
                reason: shutdown::CRASH,
                restart: 1
            }]
        );
        assert_eq!(
            out[0].to_string(),
            "ctl: restarted blk as domain 4 (restart #1; domain 3 died: crash)"
        );
        assert!(
            out[0]
                .to_string()
                .starts_with("ctl: restarted blk as domain 4 (restart #1")
        );
        // Handled once; the new domain is followed.
        assert!(l.scan(&mut f).unwrap().is_empty());
        f.die(4, state::DYING, shutdown::CRASH);
        f.now = 1_000_000_000;
        let out = l.scan(&mut f).unwrap();
        assert!(matches!(
            out[0],
            Outcome::Restarted {
                new: 5,
                restart: 2,
                ..
            }
        ));
        assert_eq!(f.rebuilt, [2, 2]);
    }

    #[test]
    fn the_policy_follows_the_reason() {
        let mut f = Fake::new();
        let mut l = system(LifecycleAction::Restart);
        // on_poweroff = destroy: a clean poweroff is not restarted.
        f.die(3, state::DEAD, shutdown::POWEROFF);
        let out = l.scan(&mut f).unwrap();
        assert_eq!(
            out,
            vec![Outcome::Destroyed {
                name: "blk".into(),
                domid: 3,
                reason: shutdown::POWEROFF
            }]
        );
        assert!(f.rebuilt.is_empty());
        assert!(f.destroyed.is_empty(), "already freed by the hypervisor");
    }

    #[test]
    fn destroy_destroys_a_domain_the_hypervisor_kept() {
        let mut f = Fake::new();
        let mut l = system(LifecycleAction::Destroy);
        f.die(3, state::SHUTDOWN, shutdown::CRASH);
        let out = l.scan(&mut f).unwrap();
        assert!(matches!(out[0], Outcome::Destroyed { domid: 3, .. }));
        assert_eq!(f.destroyed, [3]);
        assert!(l.scan(&mut f).unwrap().is_empty());
    }

    #[test]
    fn preserve_leaves_it_shut_down_and_lists_it() {
        let mut f = Fake::new();
        let mut l = system(LifecycleAction::Preserve);
        f.die(3, state::SHUTDOWN, shutdown::CRASH);
        let out = l.scan(&mut f).unwrap();
        assert_eq!(
            out,
            vec![Outcome::Preserved {
                name: "blk".into(),
                domid: 3,
                reason: shutdown::CRASH
            }]
        );
        assert!(out[0].to_string().contains("preserved"));
        assert!(f.destroyed.is_empty() && f.rebuilt.is_empty());
        assert_eq!(l.preserved(), [3]);
        assert!(l.scan(&mut f).unwrap().is_empty());
        // A preserved domain is not "alive" for exit_when_idle.
        let list = f.list().unwrap();
        assert!(!l.others_alive(&list));
        assert!(l.settled(&list));
    }

    #[test]
    fn a_crash_loop_is_stopped_by_the_limiter_and_the_window_slides() {
        let mut f = Fake::new();
        let mut l = system(LifecycleAction::Restart);
        let mut cur = 3;
        for n in 1..=3 {
            f.die(cur, state::DEAD, shutdown::CRASH);
            f.now += 1_000_000_000;
            let out = l.scan(&mut f).unwrap();
            match &out[..] {
                [Outcome::Restarted { new, restart, .. }] => {
                    assert_eq!(*restart, n);
                    cur = *new;
                }
                o => panic!("{o:?}"),
            }
        }
        f.die(cur, state::DEAD, shutdown::CRASH);
        f.now += 1_000_000_000;
        let out = l.scan(&mut f).unwrap();
        assert_eq!(
            out,
            vec![Outcome::RestartLimit {
                name: "blk".into(),
                domid: cur,
                restarts: 3,
                limit: RestartLimit::default()
            }]
        );
        assert!(
            out[0]
                .to_string()
                .contains("restart limit (3 per 60000 ms) reached")
        );
        assert_eq!(f.rebuilt.len(), 3);
        assert!(l.scan(&mut f).unwrap().is_empty(), "left destroyed");

        // With the restarts spread beyond the window, the limit never trips.
        let mut f = Fake::new();
        let mut l = system(LifecycleAction::Restart);
        let mut cur = 3;
        for _ in 0..6 {
            f.die(cur, state::DEAD, shutdown::CRASH);
            f.now += 30_000_000_000;
            match &l.scan(&mut f).unwrap()[..] {
                [Outcome::Restarted { new, .. }] => cur = *new,
                o => panic!("{o:?}"),
            }
        }
    }

    #[test]
    fn a_refused_rebuild_is_reported_and_not_retried() {
        let mut f = Fake::new();
        f.refuse = Some(XenError::ENOMEM);
        let mut l = system(LifecycleAction::Restart);
        f.die(3, state::SHUTDOWN, shutdown::CRASH);
        let out = l.scan(&mut f).unwrap();
        assert_eq!(
            out,
            vec![Outcome::RestartFailed {
                name: "blk".into(),
                domid: 3,
                error: XenError::ENOMEM
            }]
        );
        assert_eq!(f.destroyed, [3]);
        assert!(l.scan(&mut f).unwrap().is_empty());
    }

    #[test]
    fn ctl_itself_and_entries_without_a_domain_are_never_acted_on() {
        let mut f = Fake::new();
        let mut l = system(LifecycleAction::Restart);
        l.records.push(record(
            3,
            "refused",
            BOOT_NO_DOMAIN,
            LifecycleAction::Restart,
        ));
        f.die(2, state::DEAD, shutdown::CRASH);
        assert!(l.scan(&mut f).unwrap().is_empty());
    }

    #[test]
    fn garbled_info_is_refused() {
        let mut b = BootDomain {
            on_crash: 9,
            ..Default::default()
        };
        b.set_name("x");
        assert!(BootRecord::from_info(&b).is_none());
        b.on_crash = 0;
        b.name[0] = 0xff;
        assert!(BootRecord::from_info(&b).is_none());
    }

    #[test]
    fn a_death_after_the_last_scan_is_not_settled() {
        let mut f = Fake::new();
        let mut l = system(LifecycleAction::Restart);
        assert!(l.settled(&f.list().unwrap()));
        f.die(3, state::DEAD, shutdown::CRASH);
        let list = f.list().unwrap();
        assert!(!l.others_alive(&list));
        assert!(!l.settled(&list), "idle, but a restart is due");
        l.scan(&mut f).unwrap();
        assert!(l.settled(&f.list().unwrap()));
    }

    #[test]
    fn others_alive_ignores_ctl_and_xenstore() {
        let mut f = Fake::new();
        let l = system(LifecycleAction::Destroy);
        assert!(l.others_alive(&f.list().unwrap()));
        f.die(3, state::DEAD, 0);
        assert!(!l.others_alive(&f.list().unwrap()));
    }
}
