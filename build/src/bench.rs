//! Benchmark results: one map from metric name to `{ value, unit, samples, note }`, printed as
//! a table and written as JSON by `cargo hv bench --json FILE`.
//!
//! Sources: the boot figures (measured by `commands::bench` from QEMU runs), every criterion
//! benchmark found under `target/criterion` that this run refreshed, and any
//! `METRIC <name> <value> <unit>` line a bench program printed.
//!
//! Names are stable: a criterion benchmark is named by its id (`bench_function("x")` → `x`,
//! `group/function` otherwise), except that a group holding a single benchmark is named after
//! the group, so a metric can be a group with one `Throughput`-carrying function.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

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

fn format_value(v: f64) -> String {
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
