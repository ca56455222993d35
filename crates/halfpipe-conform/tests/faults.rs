//! The kit can fail. Each fault of a test build of halfpipe
//! (`cargo build --features faults`, src/fault.rs, chosen with
//! `HALFPIPE_FAULT`) must fail at least one case, and the same cases must
//! pass against the same build with no fault chosen, so that the failure is
//! the fault's.
//!
//! It needs that build, so it is ignored by a plain `cargo test`;
//! `scripts/conform.sh` builds it and runs this test with
//! `HALFPIPE_FAULTS_BIN` set to it (and `.ci/run` runs that script).

use halfpipe_conform::cases;
use halfpipe_conform::report::{CaseResult, Outcome};
use halfpipe_conform::runner::{self, Options};
use halfpipe_conform::subject::Impl;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Each fault, and the cases (by name) written to catch it.
const FAULTS: &[(&str, &str)] = &[
    (
        "fin-as-end",
        "the_clients_fin_half_closes_and_the_reply_still_flows",
    ),
    (
        "half-close-dropped-after-eof",
        "the_targets_fin_comes_after_its_data_and_the_request_still_flows",
    ),
    (
        "end-as-clean-close",
        "end_resets_the_target_and_nothing_follows_it",
    ),
    (
        "late-cells-are-violations",
        "late_cells_for_closed_and_unknown_streams_are_dropped",
    ),
    (
        "optimistic-data-dropped",
        "optimistic_data_and_fin_arrive_in_order_once_connected",
    ),
    (
        "policy-before-resolution",
        "a_name_is_resolved_then_checked_and_connected",
    ),
    (
        "socks-reply-before-connected",
        "socks_connects_wait_for_connected_and_half_close_end_to_end",
    ),
    (
        "sendme-on-receipt",
        "a_target_that_reads_nothing_holds_back_stream_sendmes",
    ),
    (
        "no-window-stop",
        "the_sender_stops_at_its_windows_and_resumes_on_sendme",
    ),
    (
        "no-handshake-timeout",
        "a_silent_or_partial_handshake_is_closed_after_10_seconds",
    ),
];

/// Whether `text` names requirement `id`, followed by ")", "," or ";"
/// (so that an ID is not found inside a longer one).
fn names(text: &str, id: &str) -> bool {
    [")", ",", ";"]
        .iter()
        .any(|end| text.contains(&format!("{id}{end}")))
}

/// A wrapper that runs `bin` with `HALFPIPE_FAULT` set (or unset): the
/// kit's convention for adapting an implementation is a command like this.
fn wrapper(dir: &Path, bin: &Path, fault: Option<&str>) -> PathBuf {
    let path = dir.join(format!("halfpipe-{}", fault.unwrap_or("clean")));
    let env = match fault {
        Some(f) => format!("HALFPIPE_FAULT={f} "),
        None => String::new(),
    };
    let script = format!(
        "#!/bin/sh\nunset HALFPIPE_FAULT\n{env}exec '{}' \"$@\"\n",
        bin.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn run(cmd: &Path, only: &str, keep: &Path) -> Vec<CaseResult> {
    let opts = Options {
        imp: Impl::Command(cmd.display().to_string()),
        only: Some(only.to_string()),
        skip: Vec::new(),
        keep: keep.to_path_buf(),
        total: Duration::from_secs(300),
    };
    runner::run(cases::all(), &opts, |r| eprintln!("{}", r.line()))
}

#[test]
#[ignore = "needs halfpipe built with --features faults: scripts/conform.sh runs it"]
fn every_fault_fails_a_case_that_the_clean_build_passes() {
    let bin = PathBuf::from(
        std::env::var_os("HALFPIPE_FAULTS_BIN")
            .expect("HALFPIPE_FAULTS_BIN: a halfpipe built with --features faults"),
    );
    let dir = std::env::temp_dir().join(format!("halfpipe-conform-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clean = wrapper(&dir, &bin, None);
    let mut table =
        String::from("| fault | case | with the fault | without |\n|---|---|---|---|\n");
    let mut missed = Vec::new();
    for (fault, case) in FAULTS {
        assert!(
            cases::all().iter().any(|c| c.name == *case),
            "{case} is not a case"
        );
        let faulty = wrapper(&dir, &bin, Some(fault));
        let with = run(&faulty, case, &dir.join(fault));
        let without = run(&clean, case, &dir.join("clean"));
        // A failure that names one of the case's requirements, not a
        // timing accident elsewhere in the case.
        let failed = with.iter().any(|r| match &r.outcome {
            Outcome::Fail { expected, .. } => r.ids.iter().any(|id| names(expected, id)),
            _ => false,
        });
        let passed = !without.is_empty() && without.iter().all(|r| r.outcome == Outcome::Pass);
        let word =
            |ok: bool, yes: &str, no: &str| if ok { yes.to_string() } else { no.to_string() };
        table.push_str(&format!(
            "| `{fault}` | `{case}` | {} | {} |\n",
            word(failed, "FAIL", "pass (missed)"),
            word(passed, "PASS", "fail")
        ));
        if !failed || !passed {
            missed.push(format!(
                "{fault}: failed with it {failed}, passed without it {passed}"
            ));
        }
    }
    if let Some(out) = std::env::var_os("HALFPIPE_FAULTS_TABLE") {
        std::fs::write(out, &table).unwrap();
    }
    eprintln!("{table}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(missed.is_empty(), "{missed:#?}");
}
