//! A case: a named check of one or more requirements, run against a fresh
//! implementation, with what it needs started for it and cleaned up after.

use crate::link::{RawLink, Trace};
use crate::subject::{free_port, Impl, NotStarted, Subject, POLICY};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Why a case did not pass.
#[derive(Debug)]
pub enum CaseError {
    Fail { expected: String, got: String },
    Skip(String),
}

pub fn fail(expected: impl Into<String>, got: impl Into<String>) -> CaseError {
    CaseError::Fail {
        expected: expected.into(),
        got: got.into(),
    }
}

/// Fails with `expected` and `got` unless `ok`.
pub fn check(ok: bool, expected: impl Into<String>, got: impl Into<String>) -> Verdict {
    if ok {
        Ok(())
    } else {
        Err(fail(expected, got))
    }
}

pub type Verdict = Result<(), CaseError>;

/// Which edge the implementation plays in the case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Exit,
    Client,
}

pub struct Case {
    pub name: &'static str,
    /// The requirements it checks (docs/protocol.md).
    pub ids: &'static [&'static str],
    pub role: Role,
    /// An optional part the implementation must support (`Impl::supports`).
    pub needs: Option<&'static str>,
    /// The case's own bound; the run's total bound applies too.
    pub timeout: Duration,
    pub run: fn(&mut Ctx) -> Verdict,
}

/// What a case works with.
pub struct Ctx {
    pub imp: Impl,
    /// The case's own directory (logs, traces).
    pub dir: PathBuf,
    pub trace: Trace,
    subjects: Vec<Subject>,
    exit: Option<SocketAddr>,
}

impl Ctx {
    pub fn new(imp: Impl, dir: PathBuf) -> Ctx {
        Ctx {
            imp,
            dir,
            trace: Trace::default(),
            subjects: Vec::new(),
            exit: None,
        }
    }

    /// The exit under test, started with `extra` after the standard
    /// arguments (`exit --listen ADDR --exit-policy POLICY --link plain`).
    pub fn exit_with(&mut self, extra: &[&str]) -> Result<SocketAddr, CaseError> {
        let cmd = match &self.imp {
            Impl::RunningExit(addr) => {
                if !extra.is_empty() {
                    return Err(CaseError::Skip(format!(
                        "needs an exit started with {extra:?}; this one is already running"
                    )));
                }
                return Ok(*addr);
            }
            Impl::Command(cmd) => cmd.clone(),
        };
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args: Vec<String> = [
            "exit",
            "--listen",
            &addr.to_string(),
            "--exit-policy",
            POLICY,
            "--link",
            "plain",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = self
            .dir
            .join(format!("exit-{}.log", self.subjects.len() + 1));
        self.trace
            .note(format!("started: {cmd} {}", args.join(" ")));
        match Subject::start(&cmd, &args, addr, &log) {
            Ok(s) => {
                self.subjects.push(s);
                self.exit = Some(addr);
                Ok(addr)
            }
            Err(NotStarted::Unsupported(why)) => Err(CaseError::Skip(format!(
                "the implementation does not support it: {why}"
            ))),
            Err(NotStarted::Failed(why)) => Err(fail("the exit to start", why)),
        }
    }

    /// The exit under test with the standard arguments (started once).
    pub fn exit(&mut self) -> Result<SocketAddr, CaseError> {
        match self.exit {
            Some(a) => Ok(a),
            None => self.exit_with(&[]),
        }
    }

    /// A new link to the exit, handshake done.
    pub fn link(&mut self) -> Result<RawLink, CaseError> {
        let addr = self.exit()?;
        let mut l = RawLink::connect(addr, &self.trace)?;
        l.handshake()?;
        Ok(l)
    }

    /// A new link with one circuit on `circ`.
    pub fn linked(&mut self, circ: u32) -> Result<RawLink, CaseError> {
        let mut l = self.link()?;
        l.create_circuit(circ)?;
        Ok(l)
    }

    /// Whether every started implementation is still running.
    pub fn all_running(&mut self) -> bool {
        self.subjects.iter_mut().all(|s| s.is_running())
    }

    /// The implementations' logs so far.
    pub fn log_text(&self) -> String {
        self.subjects.iter().map(|s| s.log_text()).collect()
    }

    pub fn logs(&self) -> Vec<PathBuf> {
        self.subjects.iter().map(|s| s.log.clone()).collect()
    }
}
