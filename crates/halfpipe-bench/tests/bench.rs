//! `halfpipe-bench`: the tool runs, and its JSON holds results that were
//! checked end to end. No timing thresholds: only that the numbers are
//! there, positive, and the bytes verified.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_halfpipe-bench"))
        .args(args)
        .output()
        .expect("run halfpipe-bench")
}

fn positive(v: &Value) -> bool {
    v.as_f64().is_some_and(|x| x > 0.0)
}

#[test]
fn bench_direct_reports_checked_bulk_and_setup() {
    let out = bench(&[
        "--direct",
        "--scenario",
        "bulk,setup",
        "--size",
        "4",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert_eq!(v["schema"], "halfpipe-bench/1");
    assert_eq!(v["mode"], "direct");
    assert_eq!(v["errors"], Value::Array(vec![]), "errors: {}", v["errors"]);
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(v["date"].as_str().unwrap().ends_with('Z'));

    // bulk: exactly 4 MiB each way, hashed at both ends and equal.
    assert_eq!(v["bulk"]["size_mib"], 4);
    for dir in ["upload", "download"] {
        let t = &v["bulk"][dir];
        assert_eq!(t["bytes"], 4 << 20, "{dir}: {t}");
        assert_eq!(t["verified"], true, "{dir}: {t}");
        assert!(
            positive(&t["mib_s"]) && positive(&t["seconds"]),
            "{dir}: {t}"
        );
        assert_eq!(t["crc32"].as_str().unwrap().len(), 8);
    }
    assert_ne!(v["bulk"]["upload"]["crc32"], v["bulk"]["download"]["crc32"]);

    // setup: both default concurrency levels, every stream checked.
    let setup = v["setup"].as_array().expect("setup results");
    let levels: Vec<u64> = setup
        .iter()
        .map(|s| s["concurrency"].as_u64().unwrap())
        .collect();
    assert_eq!(levels, [1, 32]);
    for s in setup {
        assert_eq!(s["errors"], 0, "{s}");
        assert_eq!(s["completed"], v["params"]["count"], "{s}");
        assert!(positive(&s["streams_per_s"]), "{s}");
        let l = &s["latency_us"];
        let p: Vec<f64> = ["p50", "p90", "p99", "max"]
            .iter()
            .map(|k| l[k].as_f64().unwrap())
            .collect();
        assert!(p[0] > 0.0 && p.windows(2).all(|w| w[0] <= w[1]), "{l}");
    }
    // Scenarios not asked for are left out.
    for absent in ["parallel", "hold", "slow", "rtt"] {
        assert!(v.get(absent).is_none(), "{absent} present");
    }

    // The report tools read it back: combine, Markdown, chart.
    let dir = std::env::temp_dir().join(format!("halfpipe-bench-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report: PathBuf = dir.join("direct.json");
    std::fs::write(&report, &out.stdout).unwrap();
    let combined = bench(&["--combine", report.to_str().unwrap(), "--note=a test"]);
    assert!(combined.status.success());
    let c: Value = serde_json::from_slice(&combined.stdout).unwrap();
    assert_eq!(c["schema"], "halfpipe-compare/1");
    assert_eq!(c["runs"][0], v);
    let compare = dir.join("compare.json");
    std::fs::write(&compare, &combined.stdout).unwrap();
    let md = bench(&["--markdown", compare.to_str().unwrap()]);
    let md = String::from_utf8(md.stdout).unwrap();
    assert!(md.contains("## bulk") && md.contains("| direct |") && md.contains("a test"));
    let svg = dir.join("compare.svg");
    let plot = bench(&["--plot", compare.to_str().unwrap(), svg.to_str().unwrap()]);
    assert!(
        plot.status.success(),
        "{}",
        String::from_utf8_lossy(&plot.stderr)
    );
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_needs_a_route() {
    let out = bench(&["--scenario", "bulk"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socks"));
}
