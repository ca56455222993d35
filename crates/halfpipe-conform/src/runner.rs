//! Runs cases one at a time, each in a thread of its own with its own
//! bound, and keeps the logs and the cell trace of each case that fails.

use crate::case::{Case, CaseError, Ctx, Role};
use crate::report::{CaseResult, Outcome};
use crate::subject::Impl;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Options {
    pub imp: Impl,
    /// Only cases whose name or requirement IDs contain this.
    pub only: Option<String>,
    /// Cases left out: any a pattern here selects (`--skip`).
    pub skip: Vec<String>,
    /// Where each case's files go (kept for failures only).
    pub keep: PathBuf,
    /// The whole run's bound.
    pub total: Duration,
}

/// Whether `case` is selected by `--only` (and not left out by `--skip`).
pub fn selected(case: &Case, only: Option<&str>, skip: &[String]) -> bool {
    only.is_none_or(|p| matches(case, p)) && !skip.iter().any(|p| matches(case, p))
}

/// Whether `pattern` names `case`: part of its name, one of its
/// requirement IDs (R7.4) or their section (R7).
fn matches(case: &Case, pattern: &str) -> bool {
    case.name.contains(pattern)
        || case
            .ids
            .iter()
            .any(|id| *id == pattern || id.starts_with(&format!("{pattern}.")))
}

/// Runs the selected cases; `each` sees every result as it comes.
pub fn run(cases: Vec<Case>, opts: &Options, mut each: impl FnMut(&CaseResult)) -> Vec<CaseResult> {
    let since = Instant::now();
    let mut results = Vec::new();
    for case in cases {
        if !selected(&case, opts.only.as_deref(), &opts.skip) {
            continue;
        }
        let started = Instant::now();
        let outcome_and_kept = match precheck(&case, opts, since) {
            Some(outcome) => (outcome, Vec::new()),
            None => run_one(&case, opts, opts.total.saturating_sub(since.elapsed())),
        };
        let r = CaseResult {
            name: case.name,
            ids: case.ids.iter().map(|s| s.to_string()).collect(),
            outcome: outcome_and_kept.0,
            took: started.elapsed(),
            kept: outcome_and_kept.1,
        };
        each(&r);
        results.push(r);
    }
    results
}

/// How a case ends before it starts, if it does: skipped, or failed when
/// the implementation's answer to `supports` is neither yes nor no.
fn precheck(case: &Case, opts: &Options, since: Instant) -> Option<Outcome> {
    if since.elapsed() >= opts.total {
        return Some(Outcome::Skip(format!(
            "the run's total bound ({:?}) has passed",
            opts.total
        )));
    }
    if case.role == Role::Client && matches!(opts.imp, Impl::RunningExit(_)) {
        return Some(Outcome::Skip(
            "a client case, and the implementation is a running exit".into(),
        ));
    }
    if let Some(feature) = case.needs {
        match opts.imp.supports(feature) {
            Ok(true) => {}
            Ok(false) => {
                return Some(Outcome::Skip(format!(
                    "the implementation does not support {feature}"
                )))
            }
            Err(e) => {
                return Some(Outcome::Fail {
                    expected: format!("`CMD supports {feature}` to exit 0 or 127"),
                    got: e,
                })
            }
        }
    }
    None
}

fn run_one(case: &Case, opts: &Options, left: Duration) -> (Outcome, Vec<PathBuf>) {
    let dir = opts.keep.join(case.name);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return (
            Outcome::Fail {
                expected: format!("a directory for the case's files at {}", dir.display()),
                got: e.to_string(),
            },
            Vec::new(),
        );
    }
    let bound = case.timeout.min(left);
    let (tx, rx) = mpsc::channel();
    let run = case.run;
    let imp = opts.imp.clone();
    let case_dir = dir.clone();
    let pids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let case_pids = pids.clone();
    let thread = std::thread::Builder::new()
        .name(format!("case {}", case.name))
        .spawn(move || {
            let mut cx = Ctx::new(imp, case_dir);
            cx.pids = case_pids;
            let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (run)(&mut cx)));
            let trace = cx.trace.lines();
            let logs = cx.logs();
            // Dropping the context stops the implementation.
            drop(cx);
            let _ = tx.send((verdict, trace, logs));
        });
    let thread = match thread {
        Ok(t) => t,
        Err(e) => {
            return (
                Outcome::Fail {
                    expected: "a thread for the case".into(),
                    got: e.to_string(),
                },
                Vec::new(),
            )
        }
    };
    let (outcome, trace, logs) = match rx.recv_timeout(bound) {
        Ok((verdict, trace, logs)) => {
            let _ = thread.join();
            let outcome = match verdict {
                Ok(Ok(())) => Outcome::Pass,
                Ok(Err(CaseError::Skip(why))) => Outcome::Skip(why),
                Ok(Err(CaseError::Fail { expected, got })) => Outcome::Fail { expected, got },
                Err(panic) => Outcome::Fail {
                    expected: "the case to run to its end".into(),
                    got: format!("the kit panicked: {}", panic_text(&*panic)),
                },
            };
            (outcome, trace, logs)
        }
        Err(_) => {
            // Past its bound: stop what the case started, which ends the
            // case's blocked socket calls; a thread that still does not end
            // is left behind rather than waited for.
            for pid in pids.lock().map(|p| p.clone()).unwrap_or_default() {
                crate::subject::kill_group(pid, libc::SIGKILL);
            }
            let late = rx.recv_timeout(Duration::from_secs(30));
            if late.is_ok() {
                let _ = thread.join();
            }
            let (trace, logs) = late.map(|(_, t, l)| (t, l)).unwrap_or_default();
            (
                Outcome::Fail {
                    expected: format!("the case to end within {bound:?}"),
                    got: "it did not".into(),
                },
                trace,
                logs,
            )
        }
    };
    if !matches!(outcome, Outcome::Fail { .. }) {
        let _ = std::fs::remove_dir_all(&dir);
        return (outcome, Vec::new());
    }
    let mut kept = logs;
    let trace_file = dir.join("trace.txt");
    if std::fs::write(&trace_file, trace.join("\n") + "\n").is_ok() {
        kept.push(trace_file);
    }
    (outcome, kept)
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}
