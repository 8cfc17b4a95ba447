//! The credit scheduler: which vCPU runs on which physical CPU, for how long.
//!
//! Portable and clock-agnostic: every entry point takes `now` (hypervisor system time, ns)
//! and returns what the arch layer must do — which vCPU to run and until when
//! ([`Decision`]), which CPUs to interrupt ([`CpuSet`]). The arch layer programs the APIC
//! one-shot timer for [`Decision::deadline`], halts when [`Decision::next`] is `None`, and
//! calls [`Scheduler::tick`] from the timer interrupt.
//!
//! Algorithm (after Xen's credit1): time is cut into accounting periods of
//! [`SchedConfig::period_ns`]. At each period start the CPU time of the period
//! (`period × CPUs`) is shared among the *active* domains (those with a runnable or running
//! vCPU) in proportion to their weights; running debits a domain's credit by the time run.
//! Credit never accumulates beyond one period's share, so idle domains cannot hoard. A
//! domain with credit left is UNDER and runs before any OVER domain; within a priority the
//! one with more credit runs first, FIFO among equals. Slices are at most
//! [`SchedConfig::slice_ns`] and never cross a period boundary.
//!
//! Caps: a capped domain has a budget balance. Each period start adds `cap% × period` to it
//! (a balance never grows past one period's budget, so an idle domain cannot save up);
//! running takes the real time run off it, measured from the clock at each accounting point,
//! never the time that was planned. A slice is cut where the balance would reach zero (shared
//! among the domain's vCPUs running at once), and while the balance is zero or negative the
//! domain is parked. A slice that overran (a late timer interrupt, vCPUs on several CPUs
//! spending the same budget) leaves the balance negative: that debt is carried into the
//! following periods, and the domain runs again only once refills made it positive, so the
//! long-run share stays at the cap whatever the timer lateness.
//!
//! Run queues are per CPU; a CPU with no UNDER work steals from another CPU's queue before
//! it runs OVER work or goes idle. Blocked vCPUs are in no queue and cost nothing; their
//! timers (single-shot and poll timeouts) are checked at every tick and wake them.
//!
//! Timer wake-ups are never lost: every CPU's tick checks every vCPU's timers, so a timer
//! may fire on another CPU while its vCPU still runs — between the guest's
//! `VCPUOP_set_singleshot_timer` and its `SCHEDOP_block` (a host that preempts the vCPU's
//! thread makes that window milliseconds long). The timer then latches (`timer_missed`) and
//! the vCPU's next block returns at once instead of sleeping with no timer left; arming or
//! stopping the timer, or delivering `VIRQ_TIMER` (which wakes the block through the
//! upcall-pending flag), clears the latch.
//!
//! Invariants: a vCPU is in exactly one run queue iff it is runnable and not current on a
//! CPU; a vCPU is current on at most one CPU; runstate times add up to the time since the
//! vCPU was created.
//!
//! Locking: the scheduler is a plain data structure; the arch layer keeps it under the one
//! hypervisor lock together with the domain table (see `domain`).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::hypercall_args::VcpuRunstateInfo;

/// A physical CPU index (0 = the boot CPU).
pub type CpuId = usize;

/// A vCPU's handle (index into the scheduler's table; reused after its domain is gone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VcpuId(pub usize);

/// A set of physical CPUs (at most 64).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSet(pub u64);

impl CpuSet {
    pub const EMPTY: CpuSet = CpuSet(0);
    pub fn insert(&mut self, cpu: CpuId) {
        if cpu < 64 {
            self.0 |= 1 << cpu;
        }
    }
    pub fn contains(&self, cpu: CpuId) -> bool {
        cpu < 64 && self.0 & (1 << cpu) != 0
    }
    pub fn union(self, other: CpuSet) -> CpuSet {
        CpuSet(self.0 | other.0)
    }
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = CpuId> {
        (0..64).filter(move |c| self.0 & (1 << c) != 0)
    }
}

/// Xen's `RUNSTATE_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running = 0,
    Runnable = 1,
    Blocked = 2,
    Offline = 3,
}

/// Tunables.
#[derive(Clone, Copy, Debug)]
pub struct SchedConfig {
    pub period_ns: u64,
    pub slice_ns: u64,
}

impl Default for SchedConfig {
    fn default() -> Self {
        // Xen credit1: 30 ms accounting period, 10 ms ticks.
        SchedConfig {
            period_ns: 30_000_000,
            slice_ns: 10_000_000,
        }
    }
}

/// What a CPU should run next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The vCPU to run, or `None` to halt.
    pub next: Option<VcpuId>,
    /// When to call [`Scheduler::tick`] (program the one-shot timer); `None` = only when
    /// kicked.
    pub deadline: Option<u64>,
}

/// What a tick found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickResult {
    /// This CPU must call [`Scheduler::schedule`] before returning to a domain.
    pub resched: bool,
    /// Other CPUs to interrupt (they have new work).
    pub kicks: CpuSet,
    /// vCPUs whose single-shot timer fired (the event-channel layer raises `VIRQ_TIMER`).
    pub timers_fired: Vec<VcpuId>,
    /// When `resched` is false: when to tick next (re-arm the one-shot timer).
    pub deadline: Option<u64>,
}

#[derive(Clone, Debug)]
struct Vcpu {
    dom: DomId,
    index: u32,
    home: CpuId,
    online: bool,
    blocked: bool,
    /// Removed with its domain; the slot is freed once it is no longer current.
    dead: bool,
    yielded: bool,
    current_on: Option<CpuId>,
    queued: bool,
    state: RunState,
    state_entry: u64,
    times: [u64; 4],
    started_at: u64,
    timer: Option<u64>,
    poll_timer: Option<u64>,
    /// The single-shot timer fired while the vCPU was not blocked and nothing else records
    /// it: the next [`Scheduler::block`] returns at once.
    timer_missed: bool,
}

#[derive(Clone, Debug)]
struct DomSched {
    weight: u32,
    cap_percent: u32,
    credit: i64,
    /// Cap budget left, ns (only meaningful when `cap_percent > 0`); negative = debt from
    /// overruns, paid back by the following periods' refills.
    cap_balance: i64,
    paused: bool,
    vcpus: Vec<VcpuId>,
    cpu_time: u64,
}

#[derive(Clone, Debug, Default)]
struct Cpu {
    queue: VecDeque<VcpuId>,
    current: Option<VcpuId>,
    slice_end: u64,
}

/// The scheduler state for all CPUs.
pub struct Scheduler {
    cfg: SchedConfig,
    cpus: Vec<Cpu>,
    vcpus: Vec<Option<Vcpu>>,
    doms: BTreeMap<DomId, DomSched>,
    period_start: u64,
}

impl Scheduler {
    pub fn new(nr_cpus: usize, cfg: SchedConfig, now: u64) -> Self {
        Scheduler {
            cfg,
            cpus: (0..nr_cpus.clamp(1, 64)).map(|_| Cpu::default()).collect(),
            vcpus: Vec::new(),
            doms: BTreeMap::new(),
            period_start: now,
        }
    }

    pub fn nr_cpus(&self) -> usize {
        self.cpus.len()
    }

    fn v(&self, v: VcpuId) -> Option<&Vcpu> {
        self.vcpus.get(v.0).and_then(Option::as_ref)
    }

    fn vm(&mut self, v: VcpuId) -> Option<&mut Vcpu> {
        self.vcpus.get_mut(v.0).and_then(Option::as_mut)
    }

    /// Register a domain's vCPUs (all offline). Weight must be ≥ 1; cap in percent of one
    /// CPU, 0 = none.
    pub fn add_domain(
        &mut self,
        dom: DomId,
        weight: u32,
        cap_percent: u32,
        nr_vcpus: u32,
        now: u64,
    ) -> Result<Vec<VcpuId>, XenError> {
        if self.doms.contains_key(&dom) {
            return Err(XenError::EEXIST);
        }
        check_params(weight, cap_percent, nr_vcpus)?;
        let mut ids = Vec::new();
        for index in 0..nr_vcpus {
            let home = self.least_loaded_cpu();
            let vc = Vcpu {
                dom,
                index,
                home,
                online: false,
                blocked: false,
                dead: false,
                yielded: false,
                current_on: None,
                queued: false,
                state: RunState::Offline,
                state_entry: now,
                times: [0; 4],
                started_at: now,
                timer: None,
                poll_timer: None,
                timer_missed: false,
            };
            let slot = match self.vcpus.iter().position(Option::is_none) {
                Some(i) => {
                    self.vcpus[i] = Some(vc);
                    i
                }
                None => {
                    self.vcpus.push(Some(vc));
                    self.vcpus.len() - 1
                }
            };
            ids.push(VcpuId(slot));
        }
        self.doms.insert(
            dom,
            DomSched {
                weight,
                cap_percent,
                credit: 0,
                cap_balance: cap_budget(&self.cfg, cap_percent).unwrap_or(0),
                paused: false,
                vcpus: ids.clone(),
                cpu_time: 0,
            },
        );
        Ok(ids)
    }

    fn least_loaded_cpu(&self) -> CpuId {
        let mut load = alloc::vec![0usize; self.cpus.len()];
        for v in self.vcpus.iter().flatten() {
            if !v.dead {
                load[v.home] += 1;
            }
        }
        (0..self.cpus.len()).min_by_key(|&c| load[c]).unwrap_or(0)
    }

    /// Remove a domain: its vCPUs leave the queues at once; CPUs running one of them are
    /// returned (they must reschedule). Its slots are freed once no CPU runs them.
    pub fn remove_domain(&mut self, dom: DomId) -> CpuSet {
        let Some(d) = self.doms.remove(&dom) else {
            return CpuSet::EMPTY;
        };
        let mut kicks = CpuSet::EMPTY;
        for v in d.vcpus {
            self.dequeue(v);
            let Some(vc) = self.vm(v) else { continue };
            vc.dead = true;
            vc.online = false;
            match vc.current_on {
                Some(cpu) => kicks.insert(cpu),
                None => self.vcpus[v.0] = None,
            }
        }
        kicks
    }

    /// True while some CPU still runs one of `dom`'s vCPUs (its address space is live).
    pub fn domain_on_cpu(&self, dom: DomId) -> bool {
        self.cpus
            .iter()
            .filter_map(|c| c.current)
            .any(|v| self.v(v).is_some_and(|vc| vc.dom == dom))
    }

    /// The vCPU handle of `dom`'s vCPU `index`.
    pub fn vcpu(&self, dom: DomId, index: u32) -> Option<VcpuId> {
        self.doms.get(&dom)?.vcpus.get(index as usize).copied()
    }

    /// Domain and index of a vCPU.
    pub fn owner(&self, v: VcpuId) -> Option<(DomId, u32)> {
        self.v(v).filter(|vc| !vc.dead).map(|vc| (vc.dom, vc.index))
    }

    pub fn nr_vcpus(&self, dom: DomId) -> u32 {
        self.doms.get(&dom).map_or(0, |d| d.vcpus.len() as u32)
    }

    /// Total time `dom`'s vCPUs have run, ns (up to the last accounting point).
    pub fn cpu_time(&self, dom: DomId) -> u64 {
        self.doms.get(&dom).map_or(0, |d| d.cpu_time)
    }

    /// The vCPU current on `cpu`.
    pub fn current(&self, cpu: CpuId) -> Option<VcpuId> {
        self.cpus.get(cpu)?.current
    }

    pub fn params(&self, dom: DomId) -> Option<(u32, u32)> {
        self.doms.get(&dom).map(|d| (d.weight, d.cap_percent))
    }

    /// Change weight and cap.
    pub fn set_params(
        &mut self,
        dom: DomId,
        weight: u32,
        cap_percent: u32,
    ) -> Result<(), XenError> {
        let nr = self.nr_vcpus(dom);
        let d = self.doms.get_mut(&dom).ok_or(XenError::ESRCH)?;
        check_params(weight, cap_percent, nr)?;
        let budget = cap_budget(&self.cfg, cap_percent);
        d.cap_balance = match (budget, d.cap_percent) {
            (None, _) => 0,
            // Newly capped: a full period's budget.
            (Some(b), 0) => b,
            // A changed cap keeps the debt, and no more than the new budget.
            (Some(b), _) => d.cap_balance.min(b),
        };
        d.weight = weight;
        d.cap_percent = cap_percent;
        Ok(())
    }

    fn set_state(vc: &mut Vcpu, state: RunState, now: u64) {
        if vc.state == state {
            return;
        }
        let since = now.saturating_sub(vc.state_entry);
        vc.times[vc.state as usize] += since;
        vc.state = state;
        vc.state_entry = now.max(vc.state_entry);
    }

    fn dequeue(&mut self, v: VcpuId) {
        let Some(vc) = self.vm(v) else { return };
        if !vc.queued {
            return;
        }
        vc.queued = false;
        let home = vc.home;
        if let Some(cpu) = self.cpus.get_mut(home) {
            cpu.queue.retain(|&q| q != v);
        }
    }

    fn runnable(&self, v: VcpuId) -> bool {
        self.v(v).is_some_and(|vc| {
            vc.online
                && !vc.blocked
                && !vc.dead
                && self.doms.get(&vc.dom).is_some_and(|d| !d.paused)
        })
    }

    /// Bring the vCPU's queue membership and runstate in line with its flags. Returns CPUs
    /// to interrupt.
    fn refresh(&mut self, v: VcpuId, now: u64) -> CpuSet {
        let mut kicks = CpuSet::EMPTY;
        let runnable = self.runnable(v);
        let Some(vc) = self.v(v) else { return kicks };
        let (current_on, queued, home, blocked, online) =
            (vc.current_on, vc.queued, vc.home, vc.blocked, vc.online);
        if let Some(cpu) = current_on {
            if !runnable {
                // It must stop: its CPU reschedules (the state changes there).
                kicks.insert(cpu);
            }
            return kicks;
        }
        if runnable && !queued {
            if let Some(vc) = self.vm(v) {
                vc.queued = true;
                Self::set_state(vc, RunState::Runnable, now);
            }
            self.cpus[home].queue.push_back(v);
            kicks = kicks.union(self.wake_kicks(v, home));
        } else if !runnable {
            self.dequeue(v);
            let paused = !self.runnable_ignoring_block(v);
            if let Some(vc) = self.vm(v) {
                let st = if blocked && online && !paused {
                    RunState::Blocked
                } else {
                    RunState::Offline
                };
                Self::set_state(vc, st, now);
            }
        }
        kicks
    }

    fn runnable_ignoring_block(&self, v: VcpuId) -> bool {
        self.v(v).is_some_and(|vc| {
            vc.online && !vc.dead && self.doms.get(&vc.dom).is_some_and(|d| !d.paused)
        })
    }

    /// Which CPU should notice a newly runnable vCPU queued on `home`.
    fn wake_kicks(&self, v: VcpuId, home: CpuId) -> CpuSet {
        let mut k = CpuSet::EMPTY;
        if self.cpus[home].current.is_none() {
            k.insert(home);
            return k;
        }
        if let Some(idle) = (0..self.cpus.len()).find(|&c| self.cpus[c].current.is_none()) {
            k.insert(idle);
            return k;
        }
        // Preempt an OVER vCPU for an UNDER one.
        let under = self
            .v(v)
            .and_then(|vc| self.doms.get(&vc.dom))
            .is_some_and(|d| d.credit > 0);
        let cur_over = self.cpus[home]
            .current
            .and_then(|c| self.v(c))
            .and_then(|vc| self.doms.get(&vc.dom))
            .is_none_or(|d| d.credit <= 0);
        if under && cur_over {
            k.insert(home);
        }
        k
    }

    /// Bring a vCPU online (boot vCPU at domain start, `VCPUOP_up` later).
    pub fn vcpu_up(&mut self, v: VcpuId, now: u64) -> CpuSet {
        if let Some(vc) = self.vm(v) {
            vc.online = true;
        }
        self.refresh(v, now)
    }

    /// Take a vCPU offline.
    pub fn vcpu_down(&mut self, v: VcpuId, now: u64) -> CpuSet {
        if let Some(vc) = self.vm(v) {
            vc.online = false;
        }
        self.refresh(v, now)
    }

    /// The vCPU blocks until [`Scheduler::wake`] or one of its timers — unless its
    /// single-shot timer already fired while it ran (see the module doc): then it stays
    /// runnable and the block returns at once.
    pub fn block(&mut self, v: VcpuId, now: u64) -> CpuSet {
        if let Some(vc) = self.vm(v) {
            if core::mem::take(&mut vc.timer_missed) {
                return CpuSet::EMPTY;
            }
            vc.blocked = true;
        }
        self.refresh(v, now)
    }

    /// The fired timer reached the guest another way (`VIRQ_TIMER` is bound and now
    /// pending): its next block need not return early.
    pub fn timer_delivered(&mut self, v: VcpuId) {
        if let Some(vc) = self.vm(v) {
            vc.timer_missed = false;
        }
    }

    /// Wake a blocked vCPU (an event arrived, or a timer). Clears its poll timer.
    pub fn wake(&mut self, v: VcpuId, now: u64) -> CpuSet {
        match self.vm(v) {
            Some(vc) if vc.blocked => {
                vc.blocked = false;
                vc.poll_timer = None;
            }
            _ => return CpuSet::EMPTY,
        }
        self.refresh(v, now)
    }

    pub fn is_blocked(&self, v: VcpuId) -> bool {
        self.v(v).is_some_and(|vc| vc.blocked)
    }

    /// The current vCPU gives up the rest of its slice to anyone else runnable.
    pub fn yield_now(&mut self, v: VcpuId) -> CpuSet {
        let mut k = CpuSet::EMPTY;
        if let Some(vc) = self.vm(v) {
            vc.yielded = true;
            if let Some(c) = vc.current_on {
                k.insert(c);
            }
        }
        k
    }

    pub fn pause_domain(&mut self, dom: DomId, now: u64) -> CpuSet {
        self.set_paused(dom, true, now)
    }

    pub fn unpause_domain(&mut self, dom: DomId, now: u64) -> CpuSet {
        self.set_paused(dom, false, now)
    }

    fn set_paused(&mut self, dom: DomId, paused: bool, now: u64) -> CpuSet {
        let Some(d) = self.doms.get_mut(&dom) else {
            return CpuSet::EMPTY;
        };
        d.paused = paused;
        let vs = d.vcpus.clone();
        vs.into_iter()
            .fold(CpuSet::EMPTY, |k, v| k.union(self.refresh(v, now)))
    }

    /// Arm (`Some`) or cancel the single-shot timer (forgets one that fired unseen).
    pub fn set_timer(&mut self, v: VcpuId, deadline: Option<u64>) {
        if let Some(vc) = self.vm(v) {
            vc.timer = deadline;
            vc.timer_missed = false;
        }
    }

    /// Arm the timeout of a `SCHEDOP_poll` (cleared when the vCPU wakes).
    pub fn set_poll_timer(&mut self, v: VcpuId, deadline: Option<u64>) {
        if let Some(vc) = self.vm(v) {
            vc.poll_timer = deadline;
        }
    }

    /// Runstate of a vCPU as of `now` (Xen adds the time in the current state).
    pub fn runstate(&self, v: VcpuId, now: u64) -> Option<VcpuRunstateInfo> {
        let vc = self.v(v)?;
        let mut time = vc.times;
        time[vc.state as usize] += now.saturating_sub(vc.state_entry);
        Some(VcpuRunstateInfo {
            state: vc.state as i32,
            pad: 0,
            state_entry_time: vc.state_entry,
            time,
        })
    }

    /// Charge the vCPU current on `cpu` for the time since it started or was last charged.
    fn charge(&mut self, cpu: CpuId, now: u64) {
        let Some(v) = self.cpus[cpu].current else {
            return;
        };
        let Some(vc) = self.vm(v) else { return };
        let ran = now.saturating_sub(vc.started_at);
        vc.started_at = now.max(vc.started_at);
        let dom = vc.dom;
        let ran_i = i64::try_from(ran).unwrap_or(i64::MAX);
        if let Some(d) = self.doms.get_mut(&dom) {
            d.credit = d.credit.saturating_sub(ran_i);
            if d.cap_percent > 0 {
                d.cap_balance = d.cap_balance.saturating_sub(ran_i);
            }
            d.cpu_time = d.cpu_time.saturating_add(ran);
        }
    }

    fn period_end(&self) -> u64 {
        self.period_start + self.cfg.period_ns
    }

    /// Start new accounting periods up to `now`, handing out credit.
    fn account(&mut self, now: u64) {
        if now < self.period_end() {
            return;
        }
        for cpu in 0..self.cpus.len() {
            self.charge(cpu, now);
        }
        let p = self.cfg.period_ns;
        let elapsed = (now - self.period_start) / p;
        self.period_start += elapsed * p;
        let active: Vec<(DomId, u32, usize)> = self
            .doms
            .iter()
            .filter_map(|(&id, d)| {
                let n = d.vcpus.iter().filter(|&&v| self.runnable(v)).count();
                (n > 0).then_some((id, d.weight, n))
            })
            .collect();
        let total_weight: u64 = active.iter().map(|&(_, w, _)| u64::from(w)).sum();
        let total = p * self.cpus.len() as u64;
        // Refill cap budgets for every period that began; overruns stay as debt.
        let periods = i64::try_from(elapsed).unwrap_or(i64::MAX);
        for d in self.doms.values_mut() {
            if let Some(b) = cap_budget(&self.cfg, d.cap_percent) {
                d.cap_balance = d
                    .cap_balance
                    .saturating_add(b.saturating_mul(periods))
                    .min(b);
            }
        }
        for (id, w, n) in active {
            let share = (total as u128 * u128::from(w) / u128::from(total_weight.max(1))) as u64;
            let share = share.min(p * n as u64) as i64;
            if let Some(d) = self.doms.get_mut(&id) {
                d.credit = (d.credit + share).min(share).max(-(p as i64) * n as i64);
            }
        }
    }

    /// True while `v`'s domain is capped and has no budget left (or is in debt).
    fn parked(&self, v: VcpuId) -> bool {
        self.v(v)
            .and_then(|vc| self.doms.get(&vc.dom))
            .is_some_and(|d| d.cap_percent > 0 && d.cap_balance <= 0)
    }

    /// Charge every CPU running one of `dom`'s vCPUs up to `now`; returns how many do.
    fn charge_domain(&mut self, dom: DomId, now: u64) -> u64 {
        let mut running = 0;
        for cpu in 0..self.cpus.len() {
            let on_cpu = self.cpus[cpu]
                .current
                .and_then(|v| self.v(v))
                .is_some_and(|vc| vc.dom == dom);
            if on_cpu {
                self.charge(cpu, now);
                running += 1;
            }
        }
        running
    }

    /// (UNDER, credit) of an eligible queued vCPU; `None` if it may not run now.
    fn key(&self, v: VcpuId) -> Option<(bool, i64)> {
        if self.parked(v) {
            return None;
        }
        let vc = self.v(v)?;
        let d = self.doms.get(&vc.dom)?;
        Some((d.credit > 0, d.credit))
    }

    /// Best candidate in `cpu`'s queue: highest key, FIFO among equals; yielded vCPUs last.
    fn best_in(&self, cpu: CpuId) -> Option<(usize, (bool, i64))> {
        let mut best: Option<(usize, (bool, bool, i64))> = None;
        for (i, &v) in self.cpus[cpu].queue.iter().enumerate() {
            let Some((under, credit)) = self.key(v) else {
                continue;
            };
            let not_yielded = self.v(v).is_some_and(|vc| !vc.yielded);
            let k = (not_yielded, under, credit);
            let better = match best {
                None => true,
                Some((_, bk)) => (k.1, k.0, k.2) > (bk.1, bk.0, bk.2),
            };
            if better {
                best = Some((i, k));
            }
        }
        best.map(|(i, (_, u, c))| (i, (u, c)))
    }

    /// Pick the next vCPU for `cpu` and make it current. Called on a tick that asked for it,
    /// after a hypercall that blocked/yielded/paused, on a kick, and when idle.
    pub fn schedule(&mut self, cpu: CpuId, now: u64) -> Decision {
        if cpu >= self.cpus.len() {
            return Decision {
                next: None,
                deadline: None,
            };
        }
        self.account(now);
        self.charge(cpu, now);
        // Put the current vCPU back (or let it go).
        if let Some(prev) = self.cpus[cpu].current.take() {
            let runnable = self.runnable(prev);
            if let Some(vc) = self.vm(prev) {
                vc.current_on = None;
            }
            if self.v(prev).is_some_and(|vc| vc.dead) {
                self.vcpus[prev.0] = None;
            } else if runnable {
                if let Some(vc) = self.vm(prev) {
                    vc.home = cpu;
                    vc.queued = true;
                    Self::set_state(vc, RunState::Runnable, now);
                }
                self.cpus[cpu].queue.push_back(prev);
            } else {
                let _ = self.refresh(prev, now);
            }
        }
        // Own queue first; steal UNDER work before settling for OVER work.
        let own = self.best_in(cpu);
        let pick = match own {
            Some((i, (true, _))) => Some((cpu, i)),
            _ => {
                let steal = (0..self.cpus.len())
                    .filter(|&c| c != cpu)
                    .filter_map(|c| self.best_in(c).map(|(i, k)| (c, i, k)))
                    .filter(|&(_, _, (under, _))| under)
                    .max_by_key(|&(_, _, (_, credit))| credit);
                match (steal, own) {
                    (Some((c, i, _)), _) => Some((c, i)),
                    (None, Some((i, _))) => Some((cpu, i)),
                    (None, None) => (0..self.cpus.len())
                        .filter(|&c| c != cpu)
                        .filter_map(|c| self.best_in(c).map(|(i, k)| (c, i, k)))
                        .max_by_key(|&(_, _, (_, credit))| credit)
                        .map(|(c, i, _)| (c, i)),
                }
            }
        };
        let next = pick.and_then(|(c, i)| self.cpus[c].queue.remove(i));
        // A yield lasts one scheduling decision.
        for vc in self.vcpus.iter_mut().flatten() {
            if vc.home == cpu || Some(cpu) == vc.current_on {
                vc.yielded = false;
            }
        }
        let mut deadline = self.next_timer(cpu);
        if let Some(v) = next {
            // A capped domain's balance is shared by its vCPUs running now: bring it up to
            // date and give this one its part, so together they stop near zero.
            let cap_left = match self.v(v).map(|vc| vc.dom) {
                Some(dom) if self.doms.get(&dom).is_some_and(|d| d.cap_percent > 0) => {
                    let others = self.charge_domain(dom, now);
                    self.doms
                        .get(&dom)
                        .map(|d| d.cap_balance.max(1) as u64 / (others + 1))
                }
                _ => None,
            };
            if let Some(vc) = self.vm(v) {
                vc.queued = false;
                vc.home = cpu;
                vc.current_on = Some(cpu);
                vc.started_at = now;
                Self::set_state(vc, RunState::Running, now);
            }
            let mut end = (now + self.cfg.slice_ns).min(self.period_end().max(now + 1));
            if let Some(left) = cap_left {
                end = end.min(now + left.max(1));
            }
            self.cpus[cpu].current = Some(v);
            self.cpus[cpu].slice_end = end;
            deadline = Some(deadline.map_or(end, |d| d.min(end)));
        } else {
            // Idle: wake at the next period if capped work waits for its budget.
            let parked_waiting = self
                .cpus
                .iter()
                .flat_map(|c| c.queue.iter())
                .any(|&v| self.parked(v));
            if parked_waiting {
                let pe = self.period_end();
                deadline = Some(deadline.map_or(pe, |d| d.min(pe)));
            }
        }
        Decision { next, deadline }
    }

    /// Earliest timer of the vCPUs homed on `cpu` (blocked ones wait there).
    fn next_timer(&self, cpu: CpuId) -> Option<u64> {
        self.vcpus
            .iter()
            .flatten()
            .filter(|vc| vc.home == cpu && !vc.dead)
            .flat_map(|vc| [vc.timer, vc.poll_timer])
            .flatten()
            .min()
    }

    /// The timer interrupt on `cpu`: fire due timers, start new periods, and say whether
    /// this CPU must reschedule.
    pub fn tick(&mut self, cpu: CpuId, now: u64) -> TickResult {
        let mut r = TickResult::default();
        if cpu >= self.cpus.len() {
            return r;
        }
        let due: Vec<(VcpuId, bool, bool)> = self
            .vcpus
            .iter()
            .enumerate()
            .filter_map(|(i, vc)| {
                let vc = vc.as_ref()?;
                let t = vc.timer.is_some_and(|t| t <= now);
                let p = vc.poll_timer.is_some_and(|t| t <= now);
                (!vc.dead && (t || p)).then_some((VcpuId(i), t, p))
            })
            .collect();
        for (v, t, p) in due {
            if let Some(vc) = self.vm(v) {
                if t {
                    vc.timer = None;
                    // Fired while it runs (or waits to run): its next block must not sleep.
                    vc.timer_missed = !vc.blocked;
                }
                if p {
                    vc.poll_timer = None;
                }
            }
            if t {
                r.timers_fired.push(v);
            }
            r.kicks = r.kicks.union(self.wake(v, now));
        }
        self.account(now);
        // Bring the balance of what runs here up to date, so a capped vCPU whose budget ran
        // out (here or on another CPU) stops now.
        self.charge(cpu, now);
        let c = &self.cpus[cpu];
        r.resched = match c.current {
            Some(v) => now >= c.slice_end || self.parked(v) || !self.runnable(v),
            None => !c.queue.is_empty() || self.cpus.iter().any(|c| !c.queue.is_empty()),
        };
        if r.kicks.contains(cpu) {
            r.resched = true;
        }
        r.kicks.0 &= !(1u64 << cpu);
        r.deadline = self.next_deadline(cpu);
        r
    }

    /// When `cpu` must tick next if nothing else happens: its slice end, its vCPUs' timers,
    /// and (when idle with capped work parked) the next period.
    pub fn next_deadline(&self, cpu: CpuId) -> Option<u64> {
        let c = self.cpus.get(cpu)?;
        let mut d = self.next_timer(cpu);
        let mut add = |t: u64| d = Some(d.map_or(t, |x: u64| x.min(t)));
        if c.current.is_some() {
            add(c.slice_end);
        } else if self
            .cpus
            .iter()
            .flat_map(|c| c.queue.iter())
            .any(|&v| self.parked(v))
        {
            add(self.period_end());
        }
        d
    }
}

/// One period's cap budget in ns, `None` when uncapped.
fn cap_budget(cfg: &SchedConfig, cap_percent: u32) -> Option<i64> {
    (cap_percent > 0).then(|| {
        let b = u128::from(cfg.period_ns) * u128::from(cap_percent) / 100;
        i64::try_from(b).unwrap_or(i64::MAX)
    })
}

fn check_params(weight: u32, cap_percent: u32, nr_vcpus: u32) -> Result<(), XenError> {
    if weight == 0 || weight > 65535 || cap_percent > 100 * nr_vcpus.max(1) {
        return Err(XenError::EINVAL);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
