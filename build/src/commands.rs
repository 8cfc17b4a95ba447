//! What each `cargo hv` subcommand does. Console output of a booted system goes to stdout;
//! `cargo hv`'s own messages (prefixed `hv:`) and cargo's progress go to stderr.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};

use crate::bench::{self, Metric, Metrics, QemuBench};
use crate::cli::{BenchArgs, Cli, Command, ImageArgs, RunArgs, TestArgs};
use crate::image::{self, BuiltImage};
use crate::outcome::{Outcome, exit_code};
use crate::process::run_streaming;
use crate::qemu::{self, QemuConfig};
use crate::setup;
use crate::system::{self, System};
use crate::workspace::Workspace;

/// Environment variables through which `cargo hv test` hands the scenario harness the image
/// it just built (when unset, the harness builds its own).
pub const ENV_CORE_HV: &str = "BULKHEAD_CORE_HV";
pub const ENV_IMAGE: &str = "BULKHEAD_IMAGE";

/// Test threads for the scenario step: each QEMU under TCG is heavy, and the machines here
/// have 2 cores.
pub const SCENARIO_THREADS: u32 = 2;

/// Run a parsed command line; the value is the process exit status.
pub fn dispatch(cli: Cli) -> u8 {
    if let Err(e) = qemu::install_interrupt_handler() {
        eprintln!("hv: warning: {e}");
    }
    let ws = Workspace::locate();
    let result = match cli.command {
        Command::Image(a) => image_cmd(&ws, a),
        Command::Run(a) => run_cmd(&ws, a),
        Command::Test(a) => test_cmd(&ws, a),
        Command::Bench(a) => bench_cmd(&ws, a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hv: error: {e:#}");
            if qemu::interrupted() {
                exit_code::INTERRUPTED
            } else {
                exit_code::NOT_BOOTED
            }
        }
    }
}

fn load_system(ws: &Workspace, config: Option<PathBuf>) -> Result<System> {
    let path = config.unwrap_or_else(|| ws.default_system());
    Ok(system::load(&path)?)
}

fn check_interrupted() -> Result<()> {
    if qemu::interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Build and write the image of `system` into `out`.
fn build_image(ws: &Workspace, system: &System, out: &Path) -> Result<BuiltImage> {
    setup::ensure_bare_metal_target(ws)?;
    let built = image::write(ws, system, out)?;
    check_interrupted()?;
    eprintln!(
        "hv: image {} ({} bytes, {} domain(s)); hypervisor {}",
        built.image.display(),
        built.image_len,
        built.domains,
        built.core_hv.display()
    );
    Ok(built)
}

fn image_cmd(ws: &Workspace, a: ImageArgs) -> Result<u8> {
    let system = load_system(ws, a.config)?;
    let out = a.out.unwrap_or_else(|| ws.out_dir());
    let built = build_image(ws, &system, &out)?;
    println!("{}", built.image.display());
    Ok(0)
}

fn run_cmd(ws: &Workspace, a: RunArgs) -> Result<u8> {
    let system = load_system(ws, a.config)?;
    let qemu_path = setup::ensure_qemu()?;
    let built = build_image(ws, &system, &ws.out_dir())?;
    let mut append = Vec::new();
    if a.exit_when_done {
        append.push(shared_abi::console::cmdline::EXIT_WHEN_DONE.to_string());
    }
    append.extend(
        a.append
            .iter()
            .flat_map(|w| w.split_whitespace().map(String::from)),
    );
    let cfg = QemuConfig {
        qemu: qemu_path,
        kernel: built.core_hv,
        initrd: Some(built.image),
        smp: a.smp,
        memory_mib: a.memory,
        append,
    };
    let (mut machine_args, forwards) = system.machine.qemu_args();
    let mgmt = ws.out_dir().join("hvctl.sock");
    // A stale socket from an earlier run would make QEMU refuse to listen.
    let _ = std::fs::remove_file(&mgmt);
    machine_args.extend(qemu::mgmt_socket_args(&mgmt));
    eprintln!("hv: {} {}", cfg.command_line(), machine_args.join(" "));
    eprintln!(
        "hv: management line: {} (hvctl --socket {} list)",
        mgmt.display(),
        mgmt.display()
    );
    for f in &forwards {
        if f.host_port != f.wanted {
            eprintln!(
                "hv: host port {} is taken; forwarding {} instead",
                f.wanted, f.host_port
            );
        }
        eprintln!(
            "hv: forwarding http://127.0.0.1:{}/ to {} on the system's network",
            f.host_port, f.guest
        );
    }
    let stdout = std::io::stdout();
    let mut announced = false;
    let run = qemu::run_with_args(
        &cfg,
        &machine_args,
        a.timeout.map(Duration::from_secs),
        |line| {
            let mut out = stdout.lock();
            let _ = writeln!(out, "{line}");
            // A guest says `READY http <ip>:<port>` once it serves: show the host's URL.
            if !announced && let Some(url) = served_url(line, &forwards) {
                announced = true;
                let _ = writeln!(out, "hv: ready: curl {url}");
            }
            let _ = out.flush();
        },
    )?;
    if !run.stderr.trim().is_empty() {
        eprintln!("hv: QEMU said:\n{}", run.stderr.trim_end());
    }
    let outcome = Outcome::classify(run.ending);
    let judged = run.console.judge_results();
    let ready = match run.console.ready() {
        Some(r) => format!("ready with {} CPUs", r.cpus),
        None => "never ready".into(),
    };
    eprintln!(
        "hv: {outcome} after {:.2} s; {ready}; {} RESULT pass, {} fail",
        run.wall.as_secs_f64(),
        judged.passed.len(),
        judged.failed.len()
    );
    for f in &judged.failed {
        eprintln!("hv:   failed: {f}");
    }
    Ok(outcome.exit_code())
}

/// The host URL that reaches the guest server a console line announces
/// (`READY http <ip>:<port>`), if a forward leads to it.
fn served_url(line: &str, forwards: &[crate::machine::ActiveForward]) -> Option<String> {
    let rest = &line[line.find("READY http ")? + "READY http ".len()..];
    let addr: std::net::SocketAddrV4 = rest.split_whitespace().next()?.parse().ok()?;
    forwards
        .iter()
        .find(|f| f.guest == addr)
        .map(|f| format!("http://127.0.0.1:{}/", f.host_port))
}

/// True if `shared-abi` has loom models (a `cfg(loom)` item in its sources or tests).
pub fn shared_abi_has_loom(ws: &Workspace) -> bool {
    fn scan(dir: &Path) -> bool {
        let Ok(entries) = fs::read_dir(dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            let p = e.path();
            if p.is_dir() {
                scan(&p)
            } else {
                p.extension().is_some_and(|x| x == "rs")
                    && fs::read_to_string(&p).is_ok_and(|s| s.contains("cfg(loom)"))
            }
        })
    }
    ["shared-abi/src", "shared-abi/tests"]
        .iter()
        .any(|d| scan(&ws.root.join(d)))
}

/// The cargo invocations of `cargo hv test`, as data so their shape is tested.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CargoStep {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

pub fn host_test_step(filter: Option<&str>) -> CargoStep {
    let mut args: Vec<String> = ["test", "--workspace", "--exclude", "tests"]
        .map(String::from)
        .to_vec();
    if let Some(f) = filter {
        args.extend(["--".into(), f.into()]);
    }
    CargoStep { args, env: vec![] }
}

pub fn loom_step(ws: &Workspace, filter: Option<&str>) -> CargoStep {
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    if !rustflags.is_empty() {
        rustflags.push(' ');
    }
    rustflags.push_str("--cfg loom");
    let target = ws.target_dir.join("loom").display().to_string();
    CargoStep {
        args: [
            "test",
            "-p",
            "shared-abi",
            "--release",
            "--target-dir",
            &target,
            "--",
            filter.unwrap_or("loom"),
        ]
        .map(String::from)
        .to_vec(),
        env: vec![("RUSTFLAGS".into(), rustflags)],
    }
}

pub fn scenario_step(built: &BuiltImage, filter: Option<&str>) -> CargoStep {
    let mut args: Vec<String> = ["test", "-p", "tests", "--"].map(String::from).to_vec();
    if let Some(f) = filter {
        args.push(f.into());
    }
    args.push(format!("--test-threads={SCENARIO_THREADS}"));
    CargoStep {
        args,
        env: vec![
            (ENV_CORE_HV.into(), built.core_hv.display().to_string()),
            (ENV_IMAGE.into(), built.image.display().to_string()),
        ],
    }
}

/// Test counts summed over the `test result:` lines libtest printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestCounts {
    /// Add a libtest summary line (`test result: ok. 3 passed; 0 failed; 1 ignored; ...`).
    pub fn add_line(&mut self, line: &str) -> bool {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return false;
        };
        // Each `;`-separated part ends with "<number> <word>".
        let count = |what: &str| {
            rest.split(';').find_map(|part| {
                let mut words = part.split_whitespace().rev();
                let (word, n) = (words.next()?, words.next()?);
                (word == what).then(|| n.parse::<u64>().ok()).flatten()
            })
        };
        match (count("passed"), count("failed")) {
            (Some(p), Some(f)) => {
                self.passed += p;
                self.failed += f;
                self.ignored += count("ignored").unwrap_or(0);
                true
            }
            _ => false,
        }
    }
}

/// Run one cargo step, echoing its output and counting the tests it reports; killed (with
/// everything it started) after `limit`.
fn run_cargo(
    ws: &Workspace,
    step: &CargoStep,
    limit: Duration,
    counts: &mut TestCounts,
) -> Result<bool> {
    let env: String = step
        .env
        .iter()
        .map(|(k, v)| format!("{k}='{v}' "))
        .collect();
    eprintln!("hv: running {env}cargo {}", step.args.join(" "));
    let stdout = std::io::stdout();
    let status = run_streaming(
        ws.cargo_command()
            .args(&step.args)
            .envs(step.env.iter().map(|(k, v)| (k, v))),
        limit,
        |line| {
            counts.add_line(line);
            let mut o = stdout.lock();
            let _ = writeln!(o, "{line}");
            let _ = o.flush();
        },
    )?;
    Ok(status.success())
}

#[derive(Debug)]
enum StepResult {
    Passed(Duration),
    Failed(Duration, String),
    Skipped(String),
}

fn test_cmd(ws: &Workspace, a: TestArgs) -> Result<u8> {
    let start = Instant::now();
    let filter = a.filter.as_deref();
    let limit = Duration::from_secs(a.step_timeout);
    // Missing tools stop the run before anything is built (exit 2).
    setup::ensure_bare_metal_target(ws)?;
    let qemu_path = setup::ensure_qemu()?;
    eprintln!("hv: QEMU is {}", qemu_path.display());
    let mut results: Vec<(&str, StepResult)> = Vec::new();
    let mut counts = TestCounts::default();
    let timed = |f: &mut dyn FnMut() -> Result<bool>| {
        let t = Instant::now();
        match f() {
            Ok(true) => StepResult::Passed(t.elapsed()),
            Ok(false) => StepResult::Failed(t.elapsed(), "see the output above".into()),
            Err(e) => StepResult::Failed(t.elapsed(), format!("{e:#}")),
        }
    };

    eprintln!("\n==> hv test [1/4]: host tests");
    results.push((
        "host tests",
        timed(&mut || run_cargo(ws, &host_test_step(filter), limit, &mut counts)),
    ));
    check_interrupted()?;

    eprintln!("\n==> hv test [2/4]: loom models");
    if shared_abi_has_loom(ws) {
        results.push((
            "loom models",
            timed(&mut || run_cargo(ws, &loom_step(ws, filter), limit, &mut counts)),
        ));
    } else {
        eprintln!("hv: shared-abi has no cfg(loom) module yet; skipping");
        results.push((
            "loom models",
            StepResult::Skipped("shared-abi has no cfg(loom) module".into()),
        ));
    }
    check_interrupted()?;

    eprintln!("\n==> hv test [3/4]: boot image");
    let system = load_system(ws, Some(ws.base_system()))?;
    let mut built = None;
    results.push((
        "boot image",
        timed(&mut || {
            built = Some(build_image(ws, &system, &ws.out_dir())?);
            Ok(true)
        }),
    ));
    check_interrupted()?;

    eprintln!("\n==> hv test [4/4]: QEMU scenarios");
    match &built {
        Some(b) => results.push((
            "QEMU scenarios",
            timed(&mut || run_cargo(ws, &scenario_step(b, filter), limit, &mut counts)),
        )),
        None => results.push((
            "QEMU scenarios",
            StepResult::Skipped("no boot image (its build failed)".into()),
        )),
    }
    check_interrupted()?;

    eprintln!("\nhv: test summary");
    let mut failed = false;
    for (name, r) in &results {
        match r {
            StepResult::Passed(d) => eprintln!("  {name:<15} ok      {:>7.1} s", d.as_secs_f64()),
            StepResult::Failed(d, why) => {
                failed = true;
                eprintln!("  {name:<15} FAILED  {:>7.1} s  {why}", d.as_secs_f64());
            }
            StepResult::Skipped(why) => eprintln!("  {name:<15} skipped            {why}"),
        }
    }
    // A missing image is a failure even though its step was "skipped".
    failed |= built.is_none();
    eprintln!(
        "hv: cargo hv test {} in {:.1} s",
        if failed { "FAILED" } else { "passed" },
        start.elapsed().as_secs_f64()
    );
    // The closing line CI reads: every test of every step, in libtest's words.
    println!(
        "total: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
    Ok(if failed { exit_code::FAILURE } else { 0 })
}

pub use crate::bench::selected;

pub const BOOT_TO_READY: &str = "boot_to_ready_ms";
pub const BOOT_QEMU_WALL: &str = "boot_qemu_wall_ms";
const BENCH_SMP: u32 = 2;
const BENCH_MEMORY_MIB: u32 = 256;
const BENCH_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest `cargo bench --workspace` may take before it is killed.
const BENCH_LIMIT: Duration = Duration::from_secs(60 * 60);

fn boot_benchmarks(ws: &Workspace, boots: u32, metrics: &mut Metrics) -> Result<()> {
    let qemu_path = setup::ensure_qemu()?;
    let system = load_system(ws, Some(ws.base_system()))?;
    let built = build_image(ws, &system, &ws.out_dir())?;
    let cfg = QemuConfig {
        qemu: qemu_path,
        kernel: built.core_hv,
        initrd: Some(built.image),
        smp: BENCH_SMP,
        memory_mib: BENCH_MEMORY_MIB,
        append: vec![shared_abi::console::cmdline::EXIT_WHEN_DONE.to_string()],
    };
    eprintln!("hv: {boots} boots of: {}", cfg.command_line());
    let mut to_ready = Vec::new();
    let mut wall = Vec::new();
    for i in 1..=boots {
        let run = qemu::run(&cfg, Some(BENCH_BOOT_TIMEOUT), |_| {})?;
        let outcome = Outcome::classify(run.ending);
        if outcome != Outcome::CleanPoweroff {
            bail!(
                "boot {i}: {outcome}; last console lines:\n{}{}",
                run.console.tail(20),
                run.stderr
            );
        }
        let Some((value, unit)) = run.console.metric(BOOT_TO_READY) else {
            bail!(
                "boot {i}: no `METRIC {BOOT_TO_READY}` line; last console lines:\n{}",
                run.console.tail(20)
            );
        };
        if unit != "ms" {
            bail!("boot {i}: METRIC {BOOT_TO_READY} is in {unit:?}, expected ms");
        }
        let wall_ms = run.wall.as_secs_f64() * 1000.0;
        eprintln!("hv: boot {i}/{boots}: {BOOT_TO_READY} {value} ms, QEMU wall {wall_ms:.1} ms");
        to_ready.push(value);
        wall.push(wall_ms);
    }
    let how = format!("q35, TCG, -smp {BENCH_SMP}, -m {BENCH_MEMORY_MIB}M");
    if let Some(v) = bench::median(&to_ready) {
        metrics.insert(
            BOOT_TO_READY.into(),
            Metric {
                value: v,
                unit: "ms".into(),
                samples: to_ready.len() as u64,
                note: format!(
                    "median of {boots} boots ({how}): core-hv's METRIC line, first instruction to ready"
                ),
            },
        );
    }
    if let Some(v) = bench::median(&wall) {
        metrics.insert(
            BOOT_QEMU_WALL.into(),
            Metric {
                value: v,
                unit: "ms".into(),
                samples: wall.len() as u64,
                note: format!(
                    "median of {boots} boots ({how}): QEMU process wall time with exit_when_done"
                ),
            },
        );
    }
    Ok(())
}

/// Boot one in-QEMU benchmark system up to `max_boots` times (its own count at most) and
/// return its figures. A boot that does not power off cleanly, fails a `RESULT`, or misses a
/// metric fails the whole system: a partial figure would be a wrong one.
fn qemu_bench(ws: &Workspace, b: &QemuBench, max_boots: u32) -> Result<Metrics> {
    let qemu_path = setup::ensure_qemu()?;
    let system = load_system(ws, Some(ws.root.join(b.path())))?;
    let built = build_image(ws, &system, &ws.out_dir())?;
    let cfg = QemuConfig {
        qemu: qemu_path,
        kernel: built.core_hv,
        initrd: Some(built.image),
        smp: b.smp,
        memory_mib: bench::QEMU_BENCH_MEMORY_MIB,
        append: vec![shared_abi::console::cmdline::EXIT_WHEN_DONE.to_string()],
    };
    let boots = b.boots.min(max_boots).max(1);
    eprintln!("hv: {boots} boots of: {}", cfg.command_line());
    let mut samples = Vec::new();
    for i in 1..=boots {
        check_interrupted()?;
        // The system file's own [machine] devices, then the bench's.
        let mut extra = system.machine.qemu_args().0;
        extra.extend(b.qemu_args.iter().map(|s| s.to_string()));
        let run = qemu::run_with_args(&cfg, &extra, Some(b.time_limit), |_| {})?;
        let outcome = Outcome::classify(run.ending);
        let judged = run.console.judge_results();
        if outcome != Outcome::CleanPoweroff || !judged.failed.is_empty() {
            bail!(
                "boot {i}: {outcome}; failed RESULTs: {:?}; last console lines:\n{}{}",
                judged.failed,
                run.console.tail(20),
                run.stderr
            );
        }
        let values = bench::boot_values(&run.console.metrics(), b.metrics).map_err(|e| {
            anyhow!(
                "boot {i}: {e}; last console lines:\n{}",
                run.console.tail(20)
            )
        })?;
        let shown: Vec<String> = values
            .iter()
            .map(|(n, v)| format!("{n} {} {}", bench::format_value(v.value), v.unit))
            .collect();
        eprintln!(
            "hv: {} boot {i}/{boots} ({:.1} s): {}",
            b.system,
            run.wall.as_secs_f64(),
            shown.join(", ")
        );
        samples.push(values);
    }
    let how = format!(
        "q35, TCG, -smp {}, -m {}M",
        b.smp,
        bench::QEMU_BENCH_MEMORY_MIB
    );
    Ok(bench::summarize_boots(b, &samples, &how)?)
}

/// Every in-QEMU benchmark system the filter selects; one that fails is reported and the
/// others still run. The error lists the systems that failed.
fn qemu_benchmarks(
    ws: &Workspace,
    filter: Option<&str>,
    max_boots: u32,
    metrics: &mut Metrics,
) -> Result<()> {
    let mut failed = Vec::new();
    for b in bench::QEMU_BENCHES.iter().filter(|b| b.selected(filter)) {
        check_interrupted()?;
        eprintln!("\nhv: benchmark system {}", b.path());
        match qemu_bench(ws, b, max_boots) {
            Ok(m) => metrics.extend(m),
            Err(e) => {
                eprintln!("hv: error: {}: {e:#}", b.path());
                failed.push(b.path());
            }
        }
    }
    if !failed.is_empty() {
        bail!("benchmark system(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

fn criterion_benchmarks(ws: &Workspace, filter: Option<&str>, metrics: &mut Metrics) -> Result<()> {
    // File times have coarse granularity on some filesystems: allow a little slack.
    let since = SystemTime::now() - Duration::from_secs(2);
    let mut args: Vec<OsString> = ["bench", "--workspace"].map(OsString::from).to_vec();
    if let Some(f) = filter {
        args.extend(["--".into(), f.into()]);
    }
    eprintln!(
        "hv: running cargo {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut output = String::new();
    let status = run_streaming(ws.cargo_command().args(&args), BENCH_LIMIT, |line| {
        eprintln!("{line}");
        output.push_str(line);
        output.push('\n');
    })?;
    if !status.success() {
        bail!("`cargo bench --workspace` failed ({status})");
    }
    for (name, m) in bench::collect_criterion(&ws.criterion_dir(), Some(since))? {
        metrics.insert(name, m);
    }
    for (name, m) in bench::metric_lines(&output, "cargo bench") {
        if metrics.contains_key(&name) {
            eprintln!(
                "hv: warning: METRIC {name} also names a criterion benchmark; keeping the METRIC line"
            );
        }
        metrics.insert(name, m);
    }
    Ok(())
}

fn bench_cmd(ws: &Workspace, a: BenchArgs) -> Result<u8> {
    let filter = a.filter.as_deref();
    let mut metrics = Metrics::new();
    // A failing boot, benchmark system or `cargo bench` (a crate that does not build) must
    // not lose the other figures: report what was measured, then fail.
    let boot = if selected(BOOT_TO_READY, filter) || selected(BOOT_QEMU_WALL, filter) {
        boot_benchmarks(ws, a.boots, &mut metrics).context("boot figures")
    } else {
        Ok(())
    };
    check_interrupted()?;
    let in_qemu = qemu_benchmarks(ws, filter, a.boots, &mut metrics);
    check_interrupted()?;
    let criterion = criterion_benchmarks(ws, filter, &mut metrics);
    check_interrupted()?;
    // Bench programs may ignore the filter; the report does not.
    metrics.retain(|name, _| selected(name, filter));
    print!("{}", bench::table(&metrics));
    if let Some(path) = &a.json {
        fs::write(path, bench::to_json(&metrics)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("hv: wrote {} metrics to {}", metrics.len(), path.display());
    }
    let mut failed = false;
    for e in [boot, in_qemu, criterion]
        .into_iter()
        .filter_map(Result::err)
    {
        eprintln!("hv: error: {e:#}");
        failed = true;
    }
    Ok(if failed { exit_code::FAILURE } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws() -> Workspace {
        Workspace {
            root: "/p".into(),
            target_dir: "/p/target".into(),
            cargo: "cargo".into(),
        }
    }

    #[test]
    fn host_tests_exclude_the_scenarios_and_pass_the_filter() {
        assert_eq!(
            host_test_step(None).args,
            ["test", "--workspace", "--exclude", "tests"]
        );
        assert_eq!(
            host_test_step(Some("ring")).args,
            ["test", "--workspace", "--exclude", "tests", "--", "ring"]
        );
    }

    #[test]
    fn loom_step_uses_its_own_target_dir_and_cfg() {
        let s = loom_step(&ws(), None);
        assert_eq!(
            s.args,
            [
                "test",
                "-p",
                "shared-abi",
                "--release",
                "--target-dir",
                "/p/target/loom",
                "--",
                "loom"
            ]
        );
        assert!(s.env[0].1.ends_with("--cfg loom"));
        assert_eq!(loom_step(&ws(), Some("ring")).args.last().unwrap(), "ring");
    }

    #[test]
    fn scenario_step_hands_over_the_image_and_limits_threads() {
        let b = BuiltImage {
            core_hv: "/o/core-hv".into(),
            image: "/o/default.img".into(),
            domains: 0,
            image_len: 64,
        };
        let s = scenario_step(&b, Some("boot"));
        assert_eq!(
            s.args,
            ["test", "-p", "tests", "--", "boot", "--test-threads=2"]
        );
        assert_eq!(
            s.env,
            [
                (ENV_CORE_HV.to_string(), "/o/core-hv".to_string()),
                (ENV_IMAGE.to_string(), "/o/default.img".to_string())
            ]
        );
    }

    #[test]
    fn loom_detection_follows_the_cfg_string() {
        let root = std::env::temp_dir().join(format!("hv-loom-{}", std::process::id()));
        let src = root.join("shared-abi/src/ring");
        fs::create_dir_all(&src).unwrap();
        let w = Workspace {
            root: root.clone(),
            ..ws()
        };
        fs::write(src.join("mod.rs"), "pub fn f() {}").unwrap();
        assert!(!shared_abi_has_loom(&w));
        fs::write(src.join("loom.rs"), "#[cfg(loom)]\nmod models {}").unwrap();
        assert!(shared_abi_has_loom(&w));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn libtest_summaries_are_counted() {
        let mut c = TestCounts::default();
        assert!(c.add_line(
            "test result: ok. 57 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 3.52s"
        ));
        assert!(c.add_line(
            "test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
        ));
        assert!(!c.add_line("test boot::x ... ok"));
        assert!(!c.add_line("test result: garbage"));
        assert_eq!(
            c,
            TestCounts {
                passed: 60,
                failed: 1,
                ignored: 2
            }
        );
    }

    #[test]
    fn bench_filter_selects_by_substring() {
        assert!(selected(BOOT_TO_READY, None));
        assert!(selected(BOOT_TO_READY, Some("boot")));
        assert!(!selected(BOOT_QEMU_WALL, Some("ready")));
    }
}
