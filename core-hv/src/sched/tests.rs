//! Scheduler tests on a simulated clock: a discrete-event loop plays the arch layer (one-shot
//! timer per CPU, IPIs as immediate reschedules) and measures CPU time from the runstates.

use super::*;

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

struct Sim {
    s: Scheduler,
    now: u64,
    deadline: Vec<Option<u64>>,
    /// (sample time, vCPUs current at that time) for parallelism checks.
    samples: Vec<Vec<Option<VcpuId>>>,
    /// Late timer interrupts: each one fires up to this many ns after its deadline.
    late_max: u64,
    rng: u64,
}

impl Sim {
    fn new(cpus: usize) -> Sim {
        Sim {
            s: Scheduler::new(cpus, SchedConfig::default(), 0),
            now: 0,
            deadline: alloc::vec![None; cpus],
            samples: Vec::new(),
            late_max: 0,
            rng: 0,
        }
    }

    /// Timer interrupts arrive up to `late_max` ns after their deadline (as under TCG or a
    /// loaded host), by amounts drawn from `seed`.
    fn with_late_timers(mut self, late_max: u64, seed: u64) -> Sim {
        self.late_max = late_max;
        self.rng = seed | 1;
        self
    }

    /// xorshift64: how late the next timer interrupt is.
    fn lateness(&mut self) -> u64 {
        if self.late_max == 0 {
            return 0;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % (self.late_max + 1)
    }

    /// A domain with `n` vCPUs, all up.
    fn domain_n(&mut self, dom: DomId, weight: u32, cap: u32, n: u32) -> Vec<VcpuId> {
        let vs = self.s.add_domain(dom, weight, cap, n, self.now).unwrap();
        for &v in &vs {
            let k = self.s.vcpu_up(v, self.now);
            self.kick(k);
        }
        vs
    }

    fn domain(&mut self, dom: DomId, weight: u32, cap: u32) -> VcpuId {
        let v = self.s.add_domain(dom, weight, cap, 1, self.now).unwrap()[0];
        let k = self.s.vcpu_up(v, self.now);
        self.kick(k);
        v
    }

    fn resched(&mut self, cpu: CpuId) {
        let d = self.s.schedule(cpu, self.now);
        self.deadline[cpu] = d.deadline;
    }

    fn kick(&mut self, k: CpuSet) {
        for c in k.iter() {
            self.resched(c);
        }
    }

    fn start(&mut self) {
        for c in 0..self.deadline.len() {
            self.resched(c);
        }
    }

    fn run_until(&mut self, end: u64) {
        loop {
            let next = self.deadline.iter().flatten().copied().min();
            let Some(t) = next.filter(|&t| t <= end) else {
                self.now = end.max(self.now);
                return;
            };
            let late = self.lateness();
            self.now = (t + late).max(self.now);
            self.samples.push(
                (0..self.deadline.len())
                    .map(|c| self.s.current(c))
                    .collect(),
            );
            for cpu in 0..self.deadline.len() {
                if self.deadline[cpu].is_some_and(|d| d <= self.now) {
                    let r = self.s.tick(cpu, self.now);
                    if r.resched {
                        self.resched(cpu);
                    } else {
                        self.deadline[cpu] = r.deadline;
                    }
                    self.kick(r.kicks);
                }
            }
        }
    }

    fn ran(&self, v: VcpuId) -> u64 {
        self.s.runstate(v, self.now).unwrap().time[RunState::Running as usize]
    }
}

#[test]
fn weights_two_to_one_on_one_cpu_get_two_to_one_time() {
    let mut sim = Sim::new(1);
    let a = sim.domain(1, 512, 0);
    let b = sim.domain(2, 256, 0);
    sim.start();
    sim.run_until(3 * S);
    let (ta, tb) = (sim.ran(a) as f64, sim.ran(b) as f64);
    let ratio = ta / tb;
    assert!((1.8..=2.2).contains(&ratio), "a={ta} b={tb} ratio={ratio}");
    assert!(
        ta + tb >= (3 * S) as f64 * 0.999,
        "the CPU idled with work queued"
    );
}

#[test]
fn capped_domain_stays_under_its_cap() {
    let mut sim = Sim::new(1);
    let c = sim.domain(1, 256, 25);
    sim.start();
    sim.run_until(3 * S);
    let share = sim.ran(c) as f64 / (3 * S) as f64;
    assert!(share <= 0.25 + 1e-9, "capped domain ran {share}");
    assert!(
        share >= 0.24,
        "capped domain was starved below its cap: {share}"
    );
}

#[test]
fn capped_domain_next_to_a_competitor_stays_under_its_cap() {
    let mut sim = Sim::new(1);
    let c = sim.domain(1, 60000, 10);
    let o = sim.domain(2, 1, 0);
    sim.start();
    sim.run_until(3 * S);
    let share = sim.ran(c) as f64 / (3 * S) as f64;
    assert!(share <= 0.10 + 1e-9, "capped domain ran {share}");
    assert!(sim.ran(o) as f64 / (3 * S) as f64 >= 0.89);
}

/// Share of the elapsed time that `vs` ran, in percent of one CPU.
fn share_percent(sim: &Sim, vs: &[VcpuId]) -> f64 {
    let ran: u64 = vs.iter().map(|&v| sim.ran(v)).sum();
    ran as f64 * 100.0 / sim.now as f64
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(64))]

    /// Late timer interrupts make capped slices overrun their budget; the overrun is debt
    /// that later periods pay back, so the long-run share stays at the cap.
    #[test]
    fn capped_domain_with_late_timer_interrupts_stays_within_its_cap(
        seed in proptest::prelude::any::<u64>(),
        late_ms in 1u64..=8,
        cap in proptest::sample::select(alloc::vec![10u32, 25, 40, 60]),
        competitor in proptest::prelude::any::<bool>(),
    ) {
        let mut sim = Sim::new(1).with_late_timers(late_ms * MS, seed);
        let c = sim.domain(1, 256, cap);
        if competitor {
            sim.domain(2, 256, 0);
        }
        sim.start();
        sim.run_until(3 * S);
        let share = share_percent(&sim, &[c]);
        proptest::prop_assert!(
            share <= f64::from(cap) + 1.0,
            "cap {cap}%, timers up to {late_ms} ms late: ran {share:.2}%"
        );
        // Not starved either: its cap, or half the CPU next to an equal competitor.
        let due = if competitor { cap.min(50) } else { cap };
        proptest::prop_assert!(
            share >= f64::from(due) - 1.0,
            "cap {cap}%, timers up to {late_ms} ms late: starved at {share:.2}%"
        );
    }

    /// Two vCPUs of one capped domain running at once on two CPUs both spend the same
    /// budget; what they overspend together is paid back too.
    #[test]
    fn capped_two_vcpu_domain_on_two_cpus_with_late_timers_stays_within_its_cap(
        seed in proptest::prelude::any::<u64>(),
        late_ms in 0u64..=8,
        cap in proptest::sample::select(alloc::vec![20u32, 50, 90]),
    ) {
        let mut sim = Sim::new(2).with_late_timers(late_ms * MS, seed);
        let vs = sim.domain_n(1, 256, cap, 2);
        sim.domain(2, 256, 0);
        sim.start();
        sim.run_until(3 * S);
        let share = share_percent(&sim, &vs);
        proptest::prop_assert!(
            share <= f64::from(cap) + 1.0,
            "cap {cap}%, timers up to {late_ms} ms late: ran {share:.2}%"
        );
        // Every cap here is below its fair share (equal weights: one of the two CPUs).
        proptest::prop_assert!(
            share >= f64::from(cap) - 2.0,
            "cap {cap}%, timers up to {late_ms} ms late: starved at {share:.2}%"
        );
    }
}

#[test]
fn capped_domain_in_debt_is_parked_until_its_budget_is_positive() {
    // Cap 25% of a 30 ms period: 7.5 ms of budget. A timer 20 ms late lets it run 27.5 ms,
    // 20 ms beyond its budget: the next period's 7.5 ms only brings it to -12.5 ms, the one
    // after to -5 ms, and only the third refill (+2.5 ms) lets it run again.
    let mut s = Scheduler::new(1, SchedConfig::default(), 0);
    let c = s.add_domain(1, 256, 25, 1, 0).unwrap()[0];
    s.vcpu_up(c, 0);
    let d = s.schedule(0, 0);
    assert_eq!(d.next, Some(c));
    assert_eq!(d.deadline, Some(7_500_000));
    let r = s.tick(0, 27_500_000);
    assert!(r.resched);
    let d = s.schedule(0, 27_500_000);
    assert_eq!(d.next, None, "over budget: parked");
    for period in 1..=2u64 {
        let t = period * 30 * MS;
        s.tick(0, t);
        assert_eq!(
            s.schedule(0, t).next,
            None,
            "still in debt in period {period}"
        );
    }
    let t = 90 * MS;
    s.tick(0, t);
    let d = s.schedule(0, t);
    assert_eq!(d.next, Some(c), "budget positive again");
    assert_eq!(d.deadline, Some(t + 2_500_000), "runs only what is left");
}

#[test]
fn blocked_domain_gets_no_cpu_time() {
    let mut sim = Sim::new(1);
    let a = sim.domain(1, 256, 0);
    let b = sim.domain(2, 256, 0);
    sim.start();
    let k = sim.s.block(b, sim.now);
    sim.kick(k);
    let ran_before = sim.ran(b);
    sim.run_until(S);
    assert_eq!(sim.ran(b), ran_before);
    assert!(sim.ran(a) >= S - 10 * MS);
    let rs = sim.s.runstate(b, sim.now).unwrap();
    assert_eq!(rs.state, RunState::Blocked as i32);
    assert!(rs.time[RunState::Blocked as usize] >= S - 10 * MS);
}

#[test]
fn four_cpu_bound_domains_on_four_cpus_run_in_parallel() {
    let mut sim = Sim::new(4);
    let vs: Vec<VcpuId> = (1..=4).map(|d| sim.domain(d, 256, 0)).collect();
    sim.start();
    sim.run_until(S);
    for &v in &vs {
        assert!(sim.ran(v) >= S * 99 / 100, "{v:?} ran {}", sim.ran(v));
    }
    for s in &sim.samples {
        let mut running: Vec<VcpuId> = s.iter().flatten().copied().collect();
        running.sort();
        running.dedup();
        assert_eq!(running.len(), 4, "not all four ran at once: {s:?}");
    }
}

#[test]
fn three_domains_on_two_cpus_share_both_cpus_by_stealing() {
    let mut sim = Sim::new(2);
    let vs: Vec<VcpuId> = (1..=3).map(|d| sim.domain(d, 256, 0)).collect();
    sim.start();
    sim.run_until(3 * S);
    let fair = 2.0 * 3.0 * S as f64 / 3.0;
    for &v in &vs {
        let r = sim.ran(v) as f64 / fair;
        assert!(
            (0.85..=1.15).contains(&r),
            "{v:?} got {r} of its fair share"
        );
    }
}

#[test]
fn idle_cpu_steals_work_queued_on_a_busy_cpu() {
    let mut s = Scheduler::new(2, SchedConfig::default(), 0);
    let a = s.add_domain(1, 256, 0, 1, 0).unwrap()[0];
    let b = s.add_domain(2, 256, 0, 1, 0).unwrap()[0];
    s.vcpu_up(a, 0);
    s.vcpu_up(b, 0);
    // Both on CPU 0's queue: CPU 0 runs one; CPU 1, idle, takes the other.
    let d0 = s.schedule(0, 0);
    let d1 = s.schedule(1, 0);
    assert!(d0.next.is_some() && d1.next.is_some());
    assert_ne!(d0.next, d1.next);
}

#[test]
fn idle_cpu_halts_without_deadline() {
    let mut s = Scheduler::new(2, SchedConfig::default(), 0);
    let d = s.schedule(1, 5);
    assert_eq!(
        d,
        Decision {
            next: None,
            deadline: None
        }
    );
}

#[test]
fn singleshot_timer_wakes_a_blocked_vcpu_and_is_reported() {
    let mut s = Scheduler::new(1, SchedConfig::default(), 0);
    let v = s.add_domain(1, 256, 0, 1, 0).unwrap()[0];
    s.vcpu_up(v, 0);
    assert_eq!(s.schedule(0, 0).next, Some(v));
    s.set_timer(v, Some(5 * MS));
    s.block(v, MS);
    let d = s.schedule(0, MS);
    assert_eq!(d.next, None);
    assert_eq!(d.deadline, Some(5 * MS), "idle CPU must wake for the timer");
    let r = s.tick(0, 5 * MS);
    assert_eq!(r.timers_fired, alloc::vec![v]);
    assert!(r.resched);
    assert_eq!(s.schedule(0, 5 * MS).next, Some(v));
}

#[test]
fn timer_fired_by_another_cpu_before_block_is_not_lost() {
    // The guest arms its timer on CPU 0 and is preempted before it blocks; CPU 1's tick
    // finds the timer due and fires it while the vCPU still runs. The block that follows
    // must return at once: sleeping would leave the vCPU blocked with no timer at all.
    let mut sim = Sim::new(2);
    let v = sim.domain(1, 256, 0);
    sim.start();
    assert_eq!(sim.s.current(0), Some(v));
    sim.s.set_timer(v, Some(3 * MS));
    let r = sim.s.tick(1, 3 * MS);
    assert_eq!(r.timers_fired, alloc::vec![v]);
    sim.now = 3 * MS + 10_000;
    let k = sim.s.block(v, sim.now);
    assert!(k.is_empty());
    assert!(
        !sim.s.is_blocked(v),
        "a timer that already fired must end the block"
    );
    sim.resched(0);
    assert_eq!(
        sim.s.current(0),
        Some(v),
        "the vCPU runs on after its block"
    );
    // The latch is spent: the next block (with a fresh timer) sleeps until that timer.
    sim.s.set_timer(v, Some(8 * MS));
    sim.s.block(v, sim.now);
    assert!(sim.s.is_blocked(v));
    sim.resched(0);
    assert_eq!(sim.s.current(0), None);
    sim.run_until(10 * MS);
    assert!(!sim.s.is_blocked(v), "the second timer woke it");
    assert_eq!(sim.s.current(0).or(sim.s.current(1)), Some(v));
}

#[test]
fn rearmed_or_delivered_timer_does_not_end_a_later_block_early() {
    let mut s = Scheduler::new(2, SchedConfig::default(), 0);
    let v = s.add_domain(1, 256, 0, 1, 0).unwrap()[0];
    s.vcpu_up(v, 0);
    assert_eq!(s.schedule(0, 0).next, Some(v));
    // Fired unseen, then the guest arms a new timer: that one governs the block.
    s.set_timer(v, Some(MS));
    s.tick(1, MS);
    s.set_timer(v, Some(9 * MS));
    s.block(v, 2 * MS);
    assert!(s.is_blocked(v));
    assert_eq!(s.schedule(0, 2 * MS).deadline, Some(9 * MS));
    s.wake(v, 3 * MS);
    assert_eq!(s.schedule(0, 3 * MS).next, Some(v));
    // Fired and delivered as VIRQ_TIMER: the event, not the latch, ends the block.
    s.set_timer(v, Some(4 * MS));
    s.tick(1, 4 * MS);
    s.timer_delivered(v);
    s.block(v, 5 * MS);
    assert!(s.is_blocked(v));
}

#[test]
fn timer_firing_while_blocked_wakes_without_latching() {
    let mut s = Scheduler::new(1, SchedConfig::default(), 0);
    let v = s.add_domain(1, 256, 0, 1, 0).unwrap()[0];
    s.vcpu_up(v, 0);
    s.schedule(0, 0);
    s.set_timer(v, Some(2 * MS));
    s.block(v, MS);
    s.schedule(0, MS);
    let r = s.tick(0, 2 * MS);
    assert_eq!(r.timers_fired, alloc::vec![v]);
    assert_eq!(s.schedule(0, 2 * MS).next, Some(v));
    // That wake-up was used; a later block with no timer really sleeps.
    s.block(v, 3 * MS);
    assert!(s.is_blocked(v));
}

#[test]
fn poll_timeout_wakes_without_firing_the_singleshot_timer() {
    let mut s = Scheduler::new(1, SchedConfig::default(), 0);
    let v = s.add_domain(1, 256, 0, 1, 0).unwrap()[0];
    s.vcpu_up(v, 0);
    s.schedule(0, 0);
    s.set_poll_timer(v, Some(2 * MS));
    s.block(v, 0);
    s.schedule(0, 0);
    let r = s.tick(0, 2 * MS);
    assert!(r.timers_fired.is_empty());
    assert!(!s.is_blocked(v));
}

#[test]
fn runstate_times_add_up_to_elapsed_time() {
    let mut s = Scheduler::new(1, SchedConfig::default(), 0);
    let a = s.add_domain(1, 256, 0, 1, 0).unwrap()[0];
    let b = s.add_domain(2, 256, 0, 1, 0).unwrap()[0];
    s.vcpu_up(a, 0);
    s.vcpu_up(b, 0);
    s.schedule(0, 0);
    s.schedule(0, 10 * MS);
    s.block(a, 12 * MS);
    s.block(b, 12 * MS);
    s.schedule(0, 12 * MS);
    s.wake(a, 20 * MS);
    for v in [a, b] {
        let r = s.runstate(v, 40 * MS).unwrap();
        assert_eq!(r.time.iter().sum::<u64>(), 40 * MS, "{r:?}");
    }
    let rb = s.runstate(b, 40 * MS).unwrap();
    assert_eq!(rb.state, RunState::Blocked as i32);
}

#[test]
fn paused_domain_does_not_run_and_is_offline() {
    let mut s = Scheduler::new(1, SchedConfig::default(), 0);
    let a = s.add_domain(1, 256, 0, 1, 0).unwrap()[0];
    s.vcpu_up(a, 0);
    assert_eq!(s.schedule(0, 0).next, Some(a));
    let k = s.pause_domain(1, MS);
    assert!(k.contains(0), "the CPU running it must reschedule");
    assert_eq!(s.schedule(0, MS).next, None);
    assert_eq!(
        s.runstate(a, 2 * MS).unwrap().state,
        RunState::Offline as i32
    );
    s.unpause_domain(1, 3 * MS);
    assert_eq!(s.schedule(0, 3 * MS).next, Some(a));
}

#[test]
fn removed_domain_leaves_the_cpu_and_frees_its_slot_after_switch() {
    let mut s = Scheduler::new(1, SchedConfig::default(), 0);
    let a = s.add_domain(1, 256, 0, 1, 0).unwrap()[0];
    s.vcpu_up(a, 0);
    s.schedule(0, 0);
    let k = s.remove_domain(1);
    assert!(k.contains(0));
    assert!(s.domain_on_cpu(1));
    assert_eq!(s.schedule(0, MS).next, None);
    assert!(!s.domain_on_cpu(1));
    assert_eq!(s.owner(a), None);
    // The slot is reused.
    let b = s.add_domain(2, 256, 0, 1, MS).unwrap()[0];
    assert_eq!(b, a);
}

#[test]
fn yield_lets_an_equal_vcpu_run() {
    let mut s = Scheduler::new(1, SchedConfig::default(), 0);
    let a = s.add_domain(1, 256, 0, 1, 0).unwrap()[0];
    let b = s.add_domain(2, 256, 0, 1, 0).unwrap()[0];
    s.vcpu_up(a, 0);
    s.vcpu_up(b, 0);
    assert_eq!(s.schedule(0, 0).next, Some(a));
    assert!(s.yield_now(a).contains(0));
    assert_eq!(s.schedule(0, MS).next, Some(b));
}

#[test]
fn bad_parameters_are_refused() {
    let mut s = Scheduler::new(1, SchedConfig::default(), 0);
    assert_eq!(s.add_domain(1, 0, 0, 1, 0), Err(XenError::EINVAL));
    assert_eq!(s.add_domain(1, 256, 101, 1, 0), Err(XenError::EINVAL));
    s.add_domain(1, 256, 0, 2, 0).unwrap();
    assert_eq!(s.add_domain(1, 256, 0, 1, 0), Err(XenError::EEXIST));
    assert_eq!(s.set_params(1, 256, 200), Ok(()));
    assert_eq!(s.set_params(1, 70000, 0), Err(XenError::EINVAL));
    assert_eq!(s.set_params(9, 256, 0), Err(XenError::ESRCH));
}
