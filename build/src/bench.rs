//! Benchmark results: one map from metric name to `{ value, unit, samples, note }`, printed as
//! a table and written as JSON by `cargo hv bench --json FILE`.
//!
//! Sources: the boot figures (measured by `commands::bench` from QEMU runs), the in-QEMU
//! benchmark systems ([`QEMU_BENCHES`]: booted several times each, every boot's `METRIC`
//! lines gathered by [`boot_values`] and reduced to medians by [`summarize_boots`]), every
//! criterion benchmark found under `target/criterion` that this run refreshed, and any
//! `METRIC <name> <value> <unit>` line a bench program printed.
//!
//! Names are stable: a criterion benchmark is named by its id (`bench_function("x")` → `x`,
//! `group/function` otherwise), except that a group holding a single benchmark is named after
//! the group, so a metric can be a group with one `Throughput`-carrying function. An in-QEMU
//! metric is named exactly as its `METRIC` line names it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use shared_abi::console::MetricLine;

/// One figure.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Metric {
    pub value: f64,
    pub unit: String,
    pub samples: u64,
    pub note: String,
}

/// All figures of a run, by name.
pub type Metrics = BTreeMap<String, Metric>;

/// The median (mean of the middle two for an even count); `None` for no values.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// True if the metric `name` is selected by `filter` (a substring of the name).
pub fn selected(name: &str, filter: Option<&str>) -> bool {
    filter.is_none_or(|f| name.contains(f))
}

/// A system booted under QEMU with `exit_when_done` whose domains (or `core-hv` itself) print
/// `METRIC` lines: each boot must power off cleanly, fail no `RESULT` and print every metric
/// of [`QemuBench::metrics`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QemuBench {
    /// The system file's stem, under `systems/`.
    pub system: &'static str,
    /// `-smp`: the figures depend on it (same-CPU vs cross-CPU ping-pong, one CPU so a yield
    /// always switches domains).
    pub smp: u32,
    /// Boots measured when `--boots` allows as many (each boot is one sample).
    pub boots: u32,
    /// Kill a boot that runs longer than this.
    pub time_limit: Duration,
    /// The metrics every boot must print, named exactly as the `METRIC` lines name them.
    pub metrics: &'static [&'static str],
    /// QEMU arguments after the project's own (the devices the system's driver domains own).
    pub qemu_args: &'static [&'static str],
}

impl QemuBench {
    /// The system file, relative to the workspace root.
    pub fn path(&self) -> String {
        format!("systems/{}.toml", self.system)
    }

    /// True if any of the bench's metrics is selected: the whole system boots, and the
    /// report keeps only the selected metrics.
    pub fn selected(&self, filter: Option<&str>) -> bool {
        self.metrics.iter().any(|m| selected(m, filter))
    }
}

/// Machine memory of an in-QEMU benchmark boot (as in the scenarios these systems mirror).
pub const QEMU_BENCH_MEMORY_MIB: u32 = 512;

/// The in-QEMU benchmark systems, in the order `cargo hv bench` boots them.
pub const QEMU_BENCHES: &[QemuBench] = &[
    // Issue 3: PV domains. About 3 s per boot (the yielder runs to 3 s of uptime).
    QemuBench {
        system: "pv-bench",
        smp: 1,
        boots: 5,
        time_limit: Duration::from_secs(120),
        metrics: &[
            "hypercall_null_cycles",
            "domain_switch_cycles",
            "domain_build_ms",
        ],
        qemu_args: &[],
    },
    // Issue 4: event channels, grants and the shared ring on one CPU. About 1 s per boot.
    QemuBench {
        system: "evtchn-bench",
        smp: 1,
        boots: 7,
        time_limit: Duration::from_secs(120),
        metrics: &[
            "evtchn_pingpong_same_cpu_cycles",
            "gnttab_map_unmap_cycles",
            "gnttab_copy_4k_cycles_batch1",
            "gnttab_copy_4k_cycles_batch16",
            "gnttab_copy_4k_cycles_batch64",
            "ring_requests_per_s",
        ],
        qemu_args: &[],
    },
    // Issue 4: the ping-pong pair on two CPUs. Under a second per boot.
    QemuBench {
        system: "evtchn-bench-smp2",
        smp: 2,
        boots: 7,
        time_limit: Duration::from_secs(120),
        metrics: &["evtchn_pingpong_cross_cpu_cycles"],
        qemu_args: &[],
    },
    // Issue 6: a driver domain reading a virtio-blk disk (QEMU's null block driver: no file)
    // behind the emulated VT-d, interrupts as events. A few seconds per boot.
    QemuBench {
        system: "driver-bench",
        smp: 1,
        boots: 5,
        time_limit: Duration::from_secs(120),
        metrics: &["irq_to_event_cycles"],
        qemu_args: &[
            "-device",
            "intel-iommu",
            "-blockdev",
            "driver=null-co,node-name=bench0,size=67108864,read-zeroes=on",
            "-device",
            "virtio-blk-pci,drive=bench0,addr=03.0,disable-legacy=on,iommu_platform=on",
        ],
    },
    // Issue 7: blkfront through blkback-dom to a RAM disk, -smp 2 (backend and guest each on
    // a CPU). A few seconds per boot.
    QemuBench {
        system: "blk-bench",
        smp: 2,
        boots: 3,
        time_limit: Duration::from_secs(240),
        metrics: &[
            "blk_ram_randread_4k_iops_qd1",
            "blk_ram_randread_4k_iops_qd32",
            "blk_ram_randwrite_4k_iops_qd32",
            "blk_ram_seq_1m_mbps",
        ],
        qemu_args: &[],
    },
    // Issue 7: the same workload through blkback-dom to a virtio-blk disk (QEMU's null block
    // driver under a temporary snapshot overlay, so writes read back and no file is needed),
    // -smp 2 as blk-bench. A few seconds per boot.
    QemuBench {
        system: "blk-virtio-bench",
        smp: 2,
        boots: 3,
        time_limit: Duration::from_secs(240),
        metrics: &[
            "blk_virtio_randread_4k_iops_qd1",
            "blk_virtio_randread_4k_iops_qd32",
            "blk_virtio_randwrite_4k_iops_qd32",
            "blk_virtio_seq_1m_mbps",
        ],
        qemu_args: BLK_VIRTIO_QEMU_ARGS,
    },
    // Issue 7: the passthrough reference, the same workload straight on the same virtio-blk
    // device from a driver domain, -smp 2 as blk-virtio-bench. A few seconds per boot.
    QemuBench {
        system: "blk-direct-bench",
        smp: 2,
        boots: 3,
        time_limit: Duration::from_secs(240),
        metrics: &[
            "blk_direct_virtio_randread_4k_iops_qd1",
            "blk_direct_virtio_randread_4k_iops_qd32",
            "blk_direct_virtio_randwrite_4k_iops_qd32",
            "blk_direct_virtio_seq_1m_mbps",
        ],
        qemu_args: BLK_VIRTIO_QEMU_ARGS,
    },
    // Issue 8: guest to guest through netback-dom's switch (smoltcp over netfront), one queue
    // per vif, -smp 2. About 10 s per boot.
    QemuBench {
        system: "net-bench",
        smp: 2,
        boots: 3,
        time_limit: Duration::from_secs(240),
        metrics: &["net_g2g_tcp_mbps", "net_g2g_64b_pps"],
        qemu_args: &[],
    },
    // Issue 8: the same with four queues per vif (the `_mq` metrics).
    QemuBench {
        system: "net-bench-mq",
        smp: 2,
        boots: 3,
        time_limit: Duration::from_secs(240),
        metrics: &["net_g2g_tcp_mbps_mq", "net_g2g_64b_pps_mq"],
        qemu_args: &[],
    },
    // Issue 8: a guest's TCP stream out of netback-dom's virtio-net uplink to a host sink
    // (QEMU's guestfwd), one queue. A few seconds per boot.
    QemuBench {
        system: "net-uplink-bench",
        smp: 2,
        boots: 3,
        time_limit: Duration::from_secs(240),
        metrics: &["net_g2uplink_tcp_mbps"],
        qemu_args: NET_UPLINK_QEMU_ARGS,
    },
    // Issue 8: the same with four queues on the guest's vif.
    QemuBench {
        system: "net-uplink-bench-mq",
        smp: 2,
        boots: 3,
        time_limit: Duration::from_secs(240),
        metrics: &["net_g2uplink_tcp_mbps_mq"],
        qemu_args: NET_UPLINK_QEMU_ARGS,
    },
    // Issue 8: the reference, 64-byte packets over a bare granted ring between two domains
    // (the ceiling of net_g2g_64b_pps), -smp 2 as the net systems. About 2 s per boot.
    QemuBench {
        system: "net-raw-ring-bench",
        smp: 2,
        boots: 3,
        time_limit: Duration::from_secs(120),
        metrics: &["net_raw_ring_64b_pps"],
        qemu_args: &[],
    },
];

/// The uplink of the `net_g2uplink_*` systems: a modern virtio-net function at 00:04.0
/// behind the emulated VT-d on QEMU's user network, whose `guestfwd` hands each TCP
/// connection to 10.0.2.100:5001 to a program on the host reading it into /dev/null (the
/// sink: no listener in the bench runner; slirp answers ARP for that address).
const NET_UPLINK_QEMU_ARGS: &[&str] = &[
    "-device",
    "intel-iommu",
    "-netdev",
    "user,id=n0,guestfwd=tcp:10.0.2.100:5001-cmd:sh -c 'exec cat >/dev/null'",
    "-device",
    "virtio-net-pci,netdev=n0,addr=04.0,disable-legacy=on,iommu_platform=on",
];

/// The virtio-blk disk of the `blk_virtio_*` and `blk_direct_virtio_*` systems: 8 MiB of
/// QEMU's null driver (zeroes) under a temporary qcow2 overlay (`snapshot=on`), behind the
/// emulated VT-d.
const BLK_VIRTIO_QEMU_ARGS: &[&str] = &[
    "-device",
    "intel-iommu",
    "-drive",
    "if=none,id=bench0,driver=null-co,size=8388608,read-zeroes=on,snapshot=on",
    "-device",
    "virtio-blk-pci,drive=bench0,addr=03.0,disable-legacy=on,iommu_platform=on",
];

/// One metric as one boot printed it.
#[derive(Clone, Debug, PartialEq)]
pub struct BootValue {
    /// The median of the boot's lines for the metric (`domain_build_ms` is printed once per
    /// domain built; most metrics once).
    pub value: f64,
    pub unit: String,
    /// How many lines the boot printed for it.
    pub lines: usize,
}

/// Every wanted metric of one boot, by name.
pub type BootValues = BTreeMap<String, BootValue>;

/// Why a boot's or a system's figures were refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BootMetricError {
    #[error("no `METRIC {name}` line")]
    Missing { name: String },
    #[error("`METRIC {name}` lines disagree on the unit: {first:?} and {other:?}")]
    UnitsDisagree {
        name: String,
        first: String,
        other: String,
    },
    #[error("`METRIC {name}` is not a finite number: {value}")]
    NotFinite { name: String, value: String },
    #[error("boot {boot}: {source}")]
    InBoot {
        boot: usize,
        source: Box<BootMetricError>,
    },
    #[error("no boots to summarise")]
    NoBoots,
}

/// The wanted metrics of one boot's console `METRIC` lines. Lines of other names are ignored;
/// a wanted metric that is missing, not finite, or printed in two units is an error (the boot
/// did not measure what it should have).
pub fn boot_values(
    lines: &[MetricLine<'_>],
    wanted: &[&str],
) -> Result<BootValues, BootMetricError> {
    let mut out = BootValues::new();
    for &name in wanted {
        let mine: Vec<&MetricLine<'_>> = lines.iter().filter(|m| m.name == name).collect();
        let Some(first) = mine.first() else {
            return Err(BootMetricError::Missing { name: name.into() });
        };
        let mut values = Vec::with_capacity(mine.len());
        for m in &mine {
            if m.unit != first.unit {
                return Err(BootMetricError::UnitsDisagree {
                    name: name.into(),
                    first: first.unit.into(),
                    other: m.unit.into(),
                });
            }
            if !m.value.is_finite() {
                return Err(BootMetricError::NotFinite {
                    name: name.into(),
                    value: m.value.to_string(),
                });
            }
            values.push(m.value);
        }
        // Non-empty and all finite, so there is a median.
        let Some(value) = median(&values) else {
            return Err(BootMetricError::Missing { name: name.into() });
        };
        out.insert(
            name.into(),
            BootValue {
                value,
                unit: first.unit.into(),
                lines: mine.len(),
            },
        );
    }
    Ok(out)
}

/// The figures of a system's boots: per metric, the median over the boots (`samples` = the
/// number of boots). `how` describes the machine for the note.
pub fn summarize_boots(
    bench: &QemuBench,
    boots: &[BootValues],
    how: &str,
) -> Result<Metrics, BootMetricError> {
    if boots.is_empty() {
        return Err(BootMetricError::NoBoots);
    }
    let mut out = Metrics::new();
    for &name in bench.metrics {
        let mut values = Vec::with_capacity(boots.len());
        let mut unit: Option<&str> = None;
        let mut most_lines = 0;
        for (i, b) in boots.iter().enumerate() {
            let in_boot = |source| BootMetricError::InBoot {
                boot: i + 1,
                source: Box::new(source),
            };
            let Some(v) = b.get(name) else {
                return Err(in_boot(BootMetricError::Missing { name: name.into() }));
            };
            match unit {
                Some(u) if u != v.unit => {
                    return Err(in_boot(BootMetricError::UnitsDisagree {
                        name: name.into(),
                        first: u.into(),
                        other: v.unit.clone(),
                    }));
                }
                _ => unit = Some(&v.unit),
            }
            most_lines = most_lines.max(v.lines);
            values.push(v.value);
        }
        let Some(value) = median(&values) else {
            return Err(BootMetricError::Missing { name: name.into() });
        };
        let per_boot = if most_lines > 1 {
            format!("; each boot's value the median of its {most_lines} lines")
        } else {
            String::new()
        };
        out.insert(
            name.into(),
            Metric {
                value,
                unit: unit.unwrap_or_default().into(),
                samples: boots.len() as u64,
                note: format!(
                    "median of {} boots of {} ({how}){per_boot}",
                    boots.len(),
                    bench.path()
                ),
            },
        );
    }
    Ok(out)
}

#[derive(Deserialize)]
struct BenchmarkJson {
    group_id: String,
    full_id: String,
    #[serde(default)]
    throughput: Option<Throughput>,
}

#[derive(Deserialize)]
enum Throughput {
    Bits(u64),
    Bytes(u64),
    BytesDecimal(u64),
    Elements(u64),
    ElementsAndBytes { elements: u64 },
}

#[derive(Deserialize)]
struct Estimate {
    point_estimate: f64,
}

#[derive(Deserialize)]
struct EstimatesJson {
    mean: Estimate,
}

#[derive(Deserialize)]
struct SampleJson {
    iters: Vec<f64>,
}

struct Found {
    group: String,
    full_id: String,
    metric: Metric,
}

fn new_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        if p.file_name().is_some_and(|n| n == "new") {
            if p.join("benchmark.json").is_file() && p.join("estimates.json").is_file() {
                out.push(p);
            }
        } else {
            new_dirs(&p, out);
        }
    }
}

fn read_one(new: &Path) -> Result<Found> {
    let read = |name: &str| {
        let p = new.join(name);
        fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let b: BenchmarkJson = serde_json::from_str(&read("benchmark.json")?)
        .with_context(|| format!("parsing {}/benchmark.json", new.display()))?;
    let e: EstimatesJson = serde_json::from_str(&read("estimates.json")?)
        .with_context(|| format!("parsing {}/estimates.json", new.display()))?;
    let samples = read("sample.json")
        .ok()
        .and_then(|s| serde_json::from_str::<SampleJson>(&s).ok())
        .map_or(0, |s| s.iters.len() as u64);
    let ns = e.mean.point_estimate;
    let per_second = |n: u64| n as f64 / (ns * 1e-9);
    let (value, unit) = match b.throughput {
        Some(Throughput::Elements(n)) | Some(Throughput::ElementsAndBytes { elements: n }) => {
            (per_second(n), "ops/s")
        }
        Some(Throughput::Bytes(n)) | Some(Throughput::BytesDecimal(n)) => {
            (per_second(n) / 1e6, "MB/s")
        }
        Some(Throughput::Bits(n)) => (per_second(n) / 1e6, "Mbit/s"),
        None => (ns, "ns"),
    };
    Ok(Found {
        group: b.group_id,
        full_id: b.full_id,
        metric: Metric {
            value,
            unit: unit.into(),
            samples,
            note: format!("criterion, mean {ns:.1} ns per iteration"),
        },
    })
}

/// Every criterion benchmark under `dir` whose results were written at or after `since`
/// (so results left over from earlier runs, or from benchmarks since removed, are not
/// reported as fresh).
pub fn collect_criterion(dir: &Path, since: Option<SystemTime>) -> Result<Metrics> {
    let mut dirs = Vec::new();
    new_dirs(dir, &mut dirs);
    dirs.sort();
    let mut found = Vec::new();
    for d in dirs {
        if let Some(since) = since {
            let fresh = fs::metadata(d.join("estimates.json"))
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since);
            if !fresh {
                continue;
            }
        }
        found.push(read_one(&d)?);
    }
    let mut per_group: BTreeMap<String, usize> = BTreeMap::new();
    for f in &found {
        *per_group.entry(f.group.clone()).or_default() += 1;
    }
    Ok(found
        .into_iter()
        .map(|f| {
            let name = if per_group[&f.group] == 1 {
                f.group
            } else {
                f.full_id
            };
            (name, f.metric)
        })
        .collect())
}

/// The `METRIC` lines in a bench program's output.
pub fn metric_lines(output: &str, source: &str) -> Metrics {
    output
        .lines()
        .filter_map(MetricLine::parse)
        .map(|m| {
            (
                m.name.to_string(),
                Metric {
                    value: m.value,
                    unit: m.unit.to_string(),
                    samples: 1,
                    note: format!("METRIC line printed by {source}"),
                },
            )
        })
        .collect()
}

/// The metrics as an aligned text table.
pub fn table(metrics: &Metrics) -> String {
    let rows: Vec<[String; 5]> = metrics
        .iter()
        .map(|(name, m)| {
            [
                name.clone(),
                format_value(m.value),
                m.unit.clone(),
                m.samples.to_string(),
                m.note.clone(),
            ]
        })
        .collect();
    let header = ["metric", "value", "unit", "samples", "note"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:<w0$}  {:>w1$}  {:<w2$}  {:>w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A value as the table shows it (no float noise like `7.792999999999999`).
pub fn format_value(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The metrics as one pretty-printed JSON object.
pub fn to_json(metrics: &Metrics) -> Result<String> {
    Ok(serde_json::to_string_pretty(metrics)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_bench(root: &Path, dir: &str, benchmark: &str, mean_ns: f64, samples: usize) {
        let new = root.join(dir).join("new");
        fs::create_dir_all(&new).unwrap();
        fs::write(new.join("benchmark.json"), benchmark).unwrap();
        fs::write(
            new.join("estimates.json"),
            format!(
                r#"{{"mean":{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0}},"point_estimate":{mean_ns},"standard_error":0.1}},"median":{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0}},"point_estimate":1.0,"standard_error":0.1}}}}"#
            ),
        )
        .unwrap();
        let iters: Vec<String> = (0..samples).map(|i| format!("{}.0", i + 1)).collect();
        fs::write(
            new.join("sample.json"),
            format!(
                r#"{{"sampling_mode":"Linear","iters":[{}],"times":[]}}"#,
                iters.join(",")
            ),
        )
        .unwrap();
        // Criterion also keeps the previous run and an HTML report: neither is a result.
        fs::create_dir_all(root.join(dir).join("base")).unwrap();
        fs::create_dir_all(root.join(dir).join("report")).unwrap();
    }

    fn fake_criterion_dir(tag: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("hv-criterion-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        write_bench(
            &root,
            "hypercall_roundtrip_ns",
            r#"{"group_id":"hypercall_roundtrip_ns","function_id":null,"value_str":null,"throughput":null,"full_id":"hypercall_roundtrip_ns","directory_name":"hypercall_roundtrip_ns","title":"hypercall_roundtrip_ns"}"#,
            250.0,
            100,
        );
        write_bench(
            &root,
            "xenstore_ops/xenstore_ops",
            r#"{"group_id":"xenstore_ops","function_id":"xenstore_ops","value_str":null,"throughput":{"Elements":1000},"full_id":"xenstore_ops/xenstore_ops","directory_name":"xenstore_ops/xenstore_ops","title":"xenstore_ops/xenstore_ops"}"#,
            2_000_000.0,
            50,
        );
        write_bench(
            &root,
            "ring/copy_4k",
            r#"{"group_id":"ring","function_id":"copy_4k","value_str":null,"throughput":{"Bytes":4096000},"full_id":"ring/copy_4k","directory_name":"ring/copy_4k","title":"ring/copy_4k"}"#,
            1_000_000.0,
            10,
        );
        write_bench(
            &root,
            "ring/copy_64",
            r#"{"group_id":"ring","function_id":"copy_64","value_str":null,"throughput":null,"full_id":"ring/copy_64","directory_name":"ring/copy_64","title":"ring/copy_64"}"#,
            12.5,
            10,
        );
        root
    }

    #[test]
    fn criterion_results_become_named_metrics_with_units() {
        let root = fake_criterion_dir("units");
        let m = collect_criterion(&root, None).unwrap();
        let names: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "hypercall_roundtrip_ns",
                "ring/copy_4k",
                "ring/copy_64",
                "xenstore_ops"
            ]
        );
        let h = &m["hypercall_roundtrip_ns"];
        assert_eq!((h.value, h.unit.as_str(), h.samples), (250.0, "ns", 100));
        // 1000 elements per 2 ms = 500,000 ops/s.
        let x = &m["xenstore_ops"];
        assert_eq!(
            (x.value, x.unit.as_str(), x.samples),
            (500_000.0, "ops/s", 50)
        );
        // 4,096,000 bytes per 1 ms = 4096 MB/s.
        let c = &m["ring/copy_4k"];
        assert!((c.value - 4096.0).abs() < 1e-6, "{}", c.value);
        assert_eq!(c.unit, "MB/s");
        assert_eq!(m["ring/copy_64"].unit, "ns");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn stale_results_are_not_collected() {
        let root = fake_criterion_dir("stale");
        let later = SystemTime::now() + std::time::Duration::from_secs(3600);
        assert!(collect_criterion(&root, Some(later)).unwrap().is_empty());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_criterion_dir_is_empty_and_bad_json_is_an_error() {
        assert!(
            collect_criterion(Path::new("/nonexistent/criterion"), None)
                .unwrap()
                .is_empty()
        );
        let root = fake_criterion_dir("bad");
        fs::write(root.join("ring/copy_64/new/estimates.json"), "{").unwrap();
        let e = collect_criterion(&root, None).unwrap_err();
        assert!(format!("{e:#}").contains("estimates.json"), "{e:#}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn metric_lines_are_collected_from_bench_output() {
        let out = "Benchmarking x\nMETRIC grant_pages_per_domain 512 pages\nMETRIC bad x y\n";
        let m = metric_lines(out, "cargo bench");
        assert_eq!(m.len(), 1);
        assert_eq!(m["grant_pages_per_domain"].value, 512.0);
        assert_eq!(m["grant_pages_per_domain"].unit, "pages");
    }

    fn lines(text: &str) -> Vec<MetricLine<'_>> {
        text.lines().filter_map(MetricLine::parse).collect()
    }

    const PV: &QemuBench = &QEMU_BENCHES[0];

    #[test]
    fn boot_values_take_the_wanted_metrics_and_the_median_of_repeats() {
        let text = "bulkhead: domain 1 (bench) running\n\
                    METRIC domain_build_ms 3.000 ms\n\
                    METRIC domain_build_ms 5.000 ms\n\
                    (bench) METRIC hypercall_null_cycles 812 cycles\n\
                    METRIC unrelated 1 x\n\
                    (bench) METRIC domain_switch_cycles 4100 cycles\n";
        let v = boot_values(&lines(text), PV.metrics).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(
            v["domain_build_ms"],
            BootValue {
                value: 4.0,
                unit: "ms".into(),
                lines: 2
            }
        );
        assert_eq!(v["hypercall_null_cycles"].value, 812.0);
        assert_eq!(v["hypercall_null_cycles"].lines, 1);
        assert_eq!(v["domain_switch_cycles"].unit, "cycles");
        assert!(!v.contains_key("unrelated"));
    }

    #[test]
    fn boot_values_refuse_a_missing_metric_and_mixed_units() {
        let e = boot_values(
            &lines("METRIC hypercall_null_cycles 9 cycles\n"),
            PV.metrics,
        )
        .unwrap_err();
        assert_eq!(
            e,
            BootMetricError::Missing {
                name: "domain_switch_cycles".into()
            }
        );
        assert_eq!(e.to_string(), "no `METRIC domain_switch_cycles` line");
        let e = boot_values(
            &lines("METRIC domain_build_ms 3 ms\nMETRIC domain_build_ms 3000 us\n"),
            &["domain_build_ms"],
        )
        .unwrap_err();
        assert!(matches!(e, BootMetricError::UnitsDisagree { .. }), "{e}");
        let e = boot_values(&lines("METRIC x inf cycles\n"), &["x"]).unwrap_err();
        assert!(matches!(e, BootMetricError::NotFinite { .. }), "{e}");
    }

    fn boot(pairs: &[(&str, f64, &str)]) -> BootValues {
        pairs
            .iter()
            .map(|&(n, value, unit)| {
                (
                    n.to_string(),
                    BootValue {
                        value,
                        unit: unit.into(),
                        lines: 1,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn boots_summarise_to_medians_with_the_boot_count_as_samples() {
        let smp2 = QEMU_BENCHES
            .iter()
            .find(|b| b.system == "evtchn-bench-smp2")
            .unwrap();
        let name = "evtchn_pingpong_cross_cpu_cycles";
        let boots: Vec<BootValues> = [900.0, 300.0, 500.0, 700.0, 100.0]
            .iter()
            .map(|&v| boot(&[(name, v, "cycles")]))
            .collect();
        let m = summarize_boots(smp2, &boots, "q35, TCG, -smp 2").unwrap();
        assert_eq!(m.len(), 1);
        let f = &m[name];
        assert_eq!((f.value, f.unit.as_str(), f.samples), (500.0, "cycles", 5));
        assert_eq!(
            f.note,
            "median of 5 boots of systems/evtchn-bench-smp2.toml (q35, TCG, -smp 2)"
        );
    }

    #[test]
    fn summarising_refuses_no_boots_a_gap_and_a_unit_change_naming_the_boot() {
        let smp2 = &QEMU_BENCHES[2];
        let name = smp2.metrics[0];
        assert_eq!(
            summarize_boots(smp2, &[], "x").unwrap_err(),
            BootMetricError::NoBoots
        );
        let boots = [boot(&[(name, 1.0, "cycles")]), boot(&[])];
        let e = summarize_boots(smp2, &boots, "x").unwrap_err();
        assert_eq!(e.to_string(), format!("boot 2: no `METRIC {name}` line"));
        let boots = [boot(&[(name, 1.0, "cycles")]), boot(&[(name, 1.0, "ns")])];
        let e = summarize_boots(smp2, &boots, "x").unwrap_err();
        assert!(e.to_string().starts_with("boot 2: "), "{e}");
    }

    #[test]
    fn repeated_lines_per_boot_are_named_in_the_note() {
        let mut b = boot(&[
            ("hypercall_null_cycles", 800.0, "cycles"),
            ("domain_switch_cycles", 4000.0, "cycles"),
            ("domain_build_ms", 3.0, "ms"),
        ]);
        b.get_mut("domain_build_ms").unwrap().lines = 2;
        let m = summarize_boots(PV, &[b], "q35").unwrap();
        assert!(
            m["domain_build_ms"]
                .note
                .ends_with("each boot's value the median of its 2 lines"),
            "{}",
            m["domain_build_ms"].note
        );
        assert!(!m["hypercall_null_cycles"].note.contains("lines"));
    }

    #[test]
    fn every_issue_metric_has_exactly_one_bench_system_and_the_filter_picks_systems() {
        let all: Vec<&str> = QEMU_BENCHES
            .iter()
            .flat_map(|b| b.metrics)
            .copied()
            .collect();
        let mut want = vec![
            "hypercall_null_cycles",
            "domain_switch_cycles",
            "domain_build_ms",
            "evtchn_pingpong_same_cpu_cycles",
            "evtchn_pingpong_cross_cpu_cycles",
            "gnttab_map_unmap_cycles",
            "gnttab_copy_4k_cycles_batch1",
            "gnttab_copy_4k_cycles_batch16",
            "gnttab_copy_4k_cycles_batch64",
            "ring_requests_per_s",
            "irq_to_event_cycles",
            "blk_ram_randread_4k_iops_qd1",
            "blk_ram_randread_4k_iops_qd32",
            "blk_ram_randwrite_4k_iops_qd32",
            "blk_ram_seq_1m_mbps",
            "blk_virtio_randread_4k_iops_qd1",
            "blk_virtio_randread_4k_iops_qd32",
            "blk_virtio_randwrite_4k_iops_qd32",
            "blk_virtio_seq_1m_mbps",
            "blk_direct_virtio_randread_4k_iops_qd1",
            "blk_direct_virtio_randread_4k_iops_qd32",
            "blk_direct_virtio_randwrite_4k_iops_qd32",
            "blk_direct_virtio_seq_1m_mbps",
            "net_g2g_tcp_mbps",
            "net_g2g_64b_pps",
            "net_g2g_tcp_mbps_mq",
            "net_g2g_64b_pps_mq",
            "net_g2uplink_tcp_mbps",
            "net_g2uplink_tcp_mbps_mq",
            "net_raw_ring_64b_pps",
        ];
        let mut got = all.clone();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        let chosen = |f| {
            QEMU_BENCHES
                .iter()
                .filter(|b| b.selected(Some(f)))
                .map(|b| b.system)
                .collect::<Vec<_>>()
        };
        assert_eq!(chosen("gnttab_copy"), ["evtchn-bench"]);
        assert_eq!(chosen("pingpong"), ["evtchn-bench", "evtchn-bench-smp2"]);
        assert_eq!(chosen("cross_cpu"), ["evtchn-bench-smp2"]);
        assert_eq!(chosen("cycles").len(), 4);
        assert_eq!(chosen("irq_to_event"), ["driver-bench"]);
        assert!(chosen("boot_to_ready").is_empty());
        assert_eq!(chosen("blk_ram"), ["blk-bench"]);
        assert_eq!(chosen("blk_virtio"), ["blk-virtio-bench"]);
        assert_eq!(chosen("blk_direct"), ["blk-direct-bench"]);
        assert_eq!(
            chosen("blk_"),
            ["blk-bench", "blk-virtio-bench", "blk-direct-bench"]
        );
        assert_eq!(
            chosen("net_"),
            [
                "net-bench",
                "net-bench-mq",
                "net-uplink-bench",
                "net-uplink-bench-mq",
                "net-raw-ring-bench"
            ]
        );
        // A `_mq` metric's name contains its one-queue sibling's.
        assert_eq!(chosen("net_g2g_64b_pps"), ["net-bench", "net-bench-mq"]);
        assert_eq!(chosen("_mq"), ["net-bench-mq", "net-uplink-bench-mq"]);
        assert_eq!(QEMU_BENCHES.iter().filter(|b| b.selected(None)).count(), 12);
    }

    #[test]
    fn shipped_bench_systems_are_valid_and_run_the_domains_that_print_their_metrics() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for b in QEMU_BENCHES {
            let s = crate::system::load(&root.join(b.path())).unwrap();
            assert!(!s.domains.is_empty(), "{}", b.system);
            for &m in b.metrics {
                // A domain names its metric on its command line (`metric=`), or its role
                // prints it; core-hv prints domain_build_ms for every domain it builds.
                let role = match m {
                    "hypercall_null_cycles" | "domain_switch_cycles" => "role=bench",
                    "domain_build_ms" => "role=",
                    g if g.starts_with("gnttab_") => "role=bench-mapper",
                    g if g.starts_with("net_g2g_") => "role=tcp-recv",
                    g if g.starts_with("net_g2uplink_") => "role=http",
                    _ => "",
                };
                let printed_by_domain = s.domains.iter().any(|d| {
                    let words: Vec<&str> = d.cmdline.split_whitespace().collect();
                    words.contains(&format!("metric={m}").as_str())
                        || (!role.is_empty()
                            && words
                                .iter()
                                .any(|w| *w == role || (role == "role=" && w.starts_with(role))))
                });
                assert!(printed_by_domain, "{}: nothing prints {m}", b.system);
            }
        }
    }

    #[test]
    fn median_handles_odd_even_and_empty() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 2.0]), Some(2.0));
    }

    #[test]
    fn json_maps_names_to_value_unit_samples_note() {
        let mut m = Metrics::new();
        m.insert(
            "boot_to_ready_ms".into(),
            Metric {
                value: 41.5,
                unit: "ms".into(),
                samples: 7,
                note: "median".into(),
            },
        );
        let v: serde_json::Value = serde_json::from_str(&to_json(&m).unwrap()).unwrap();
        assert_eq!(v["boot_to_ready_ms"]["value"], 41.5);
        assert_eq!(v["boot_to_ready_ms"]["unit"], "ms");
        assert_eq!(v["boot_to_ready_ms"]["samples"], 7);
        assert_eq!(v["boot_to_ready_ms"]["note"], "median");
        let t = table(&m);
        assert!(t.starts_with("metric"), "{t}");
        let row: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row, ["boot_to_ready_ms", "41.5", "ms", "7", "median"]);
    }
}
