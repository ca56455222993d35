//! A case: a named check of one or more requirements, run against a fresh
//! implementation, with what it needs started for it and cleaned up after.

use crate::link::{describe, Cell, Got, RawLink, Trace, ANSWER};
use crate::subject::{free_port, Impl, NotStarted, Subject, POLICY};
use halfpipe_proto::cell::cmd;
use halfpipe_proto::relay::relay_cmd;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
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
    /// The PIDs (and groups) of what the case started, for the runner to
    /// kill if the case overruns its bound.
    pub pids: Arc<std::sync::Mutex<Vec<u32>>>,
}

impl Ctx {
    pub fn new(imp: Impl, dir: PathBuf) -> Ctx {
        Ctx {
            imp,
            dir,
            trace: Trace::default(),
            subjects: Vec::new(),
            exit: None,
            pids: Arc::default(),
        }
    }

    /// The exit under test, started with `extra` after the standard
    /// arguments (`exit --listen ADDR --exit-policy POLICY --link plain`).
    pub fn exit_with(&mut self, extra: &[&str]) -> Result<SocketAddr, CaseError> {
        self.start_exit(&["--link", "plain"], extra)
    }

    /// The fingerprint `CMD ROLE --print-fingerprint --data-dir DIR`
    /// prints (§13), making the identity in `DIR`.
    pub fn fingerprint_of(
        &mut self,
        role: &str,
        dir: &std::path::Path,
    ) -> Result<String, CaseError> {
        let Impl::Command(cmd) = &self.imp else {
            return Err(CaseError::Skip("needs --impl".into()));
        };
        let (code, stdout) = crate::subject::run_briefly(
            cmd,
            &[
                role.as_ref(),
                "--print-fingerprint".as_ref(),
                "--data-dir".as_ref(),
                dir.as_os_str(),
            ],
            ANSWER,
        )
        .map_err(|e| fail("the fingerprint", e))?;
        if code == Some(crate::subject::UNSUPPORTED) {
            return Err(CaseError::Skip(format!(
                "`{cmd} {role} --print-fingerprint` exited 127"
            )));
        }
        let fp = String::from_utf8_lossy(&stdout).trim().to_string();
        if code != Some(0) || fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(fail(
                format!("`{role} --print-fingerprint` to print 64 hex digits and exit 0"),
                format!("{fp:?}, exit status {code:?}"),
            ));
        }
        Ok(fp)
    }

    /// The exit under test on a TLS link (`--link tls --data-dir DIR`),
    /// with its fingerprint.
    pub fn tls_exit(&mut self, extra: &[&str]) -> Result<(SocketAddr, String), CaseError> {
        let dir = self
            .dir
            .join(format!("exit-data-{}", self.subjects.len() + 1));
        let fp = self.fingerprint_of("exit", &dir)?;
        let d = dir.display().to_string();
        let addr = self.start_exit(&["--link", "tls", "--data-dir", &d], extra)?;
        Ok((addr, fp))
    }

    fn start_exit(&mut self, link: &[&str], extra: &[&str]) -> Result<SocketAddr, CaseError> {
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
        let head = [
            "exit",
            "--listen",
            &addr.to_string(),
            "--exit-policy",
            POLICY,
        ];
        self.launch(&cmd, &[&head[..], link, extra].concat(), addr)?;
        self.exit = Some(addr);
        Ok(addr)
    }

    /// Starts `cmd args` (the case's ROLE first in `args`), listening on
    /// `addr`, with its log in the case's directory.
    fn launch(&mut self, cmd: &str, args: &[&str], addr: SocketAddr) -> Result<(), CaseError> {
        let role = args[0];
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let log = self
            .dir
            .join(format!("{role}-{}.log", self.subjects.len() + 1));
        self.trace
            .note(format!("started: {cmd} {}", args.join(" ")));
        match Subject::start(cmd, &args, addr, &log) {
            Ok(s) => {
                self.started(s);
                Ok(())
            }
            Err(NotStarted::Unsupported(why)) => Err(CaseError::Skip(format!(
                "the implementation does not support it: {why}"
            ))),
            Err(NotStarted::Failed(why)) => Err(fail(format!("the {role} to start"), why)),
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

    /// The client under test, linked to the kit's own exit: `CMD client
    /// --socks ADDR --exit ADDR --link plain` and `extra`.
    pub fn client_with(&mut self, extra: &[&str]) -> Result<ClientRig, CaseError> {
        let (listener, socks) = self.start_client(&["--link", "plain"], extra)?;
        let mut link = RawLink::accept(&listener, ANSWER, &self.trace)?;
        link.accept_handshake()?;
        Ok(ClientRig {
            socks,
            link,
            listener,
        })
    }

    /// The client under test on a TLS link (`--link tls --data-dir DIR
    /// --exit-fingerprint PIN`) to the kit's exit, which shows `exit` and
    /// asks for the client's certificate. Returns the rig, or why the TLS
    /// handshake failed, and the client's fingerprint and what certificate
    /// it showed.
    pub fn tls_client(
        &mut self,
        exit: &crate::tls::KitIdentity,
        pin: &str,
    ) -> Result<TlsClient, CaseError> {
        let dir = self
            .dir
            .join(format!("client-data-{}", self.subjects.len() + 1));
        let fp = self.fingerprint_of("client", &dir)?;
        let d = dir.display().to_string();
        let (listener, socks) = self.start_client(
            &["--link", "tls", "--data-dir", &d, "--exit-fingerprint", pin],
            &[],
        )?;
        let seen = Arc::new(crate::tls::Seen::default());
        let config = crate::tls::server_config(exit, true, seen.clone());
        let rig = match RawLink::accept_tls(&listener, ANSWER, config, &self.trace)? {
            Ok(mut link) => {
                link.accept_handshake()?;
                Ok(ClientRig {
                    socks,
                    link,
                    listener,
                })
            }
            Err(why) => Err(why),
        };
        Ok(TlsClient {
            rig,
            fingerprint: fp,
            seen,
        })
    }

    /// Starts `CMD client --socks ADDR --exit ADDR LINK EXTRA`; returns the
    /// kit's exit's listener and the SOCKS address.
    fn start_client(
        &mut self,
        link: &[&str],
        extra: &[&str],
    ) -> Result<(TcpListener, SocketAddr), CaseError> {
        let Impl::Command(cmd) = self.imp.clone() else {
            return Err(CaseError::Skip("a client case needs --impl".into()));
        };
        let listener = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| fail("a loopback port for the kit's exit", e.to_string()))?;
        let exit = listener.local_addr().expect("its address");
        let socks: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let head = [
            "client",
            "--socks",
            &socks.to_string(),
            "--exit",
            &exit.to_string(),
        ];
        self.launch(&cmd, &[&head[..], link, extra].concat(), socks)?;
        Ok((listener, socks))
    }

    /// `client_with(&[])`, once the circuits the client makes at start (if
    /// it makes any) are answered: until then it may rightly refuse
    /// requests as having no link (R11.15).
    pub fn client(&mut self) -> Result<ClientRig, CaseError> {
        let mut rig = self.client_with(&[])?;
        rig.settle()?;
        Ok(rig)
    }

    fn started(&mut self, s: Subject) {
        if let Ok(mut p) = self.pids.lock() {
            p.push(s.pid());
        }
        self.subjects.push(s);
    }

    /// Sends `signal` to every implementation started for the case.
    pub fn signal_all(&self, signal: i32) {
        for s in &self.subjects {
            s.signal(signal);
        }
    }

    pub fn logs(&self) -> Vec<PathBuf> {
        self.subjects.iter().map(|s| s.log.clone()).collect()
    }
}

/// A client under test on a TLS link (`Ctx::tls_client`).
pub struct TlsClient {
    /// The rig, or why the TLS handshake with the kit's exit failed.
    pub rig: Result<ClientRig, String>,
    /// What `CMD client --print-fingerprint` printed.
    pub fingerprint: String,
    /// The certificate the client showed.
    pub seen: Arc<crate::tls::Seen>,
}

/// A client under test, its SOCKS port, and its link to the kit's exit.
pub struct ClientRig {
    pub socks: SocketAddr,
    pub link: RawLink,
    /// Where the client links again after losing its link.
    pub listener: TcpListener,
}

/// A BEGIN the kit's exit received.
#[derive(Debug)]
pub struct Begin {
    pub circ: u32,
    pub stream: u16,
    pub payload: Vec<u8>,
}

impl ClientRig {
    /// Answers CREATE_FASTs until the link has been quiet for a moment.
    pub fn settle(&mut self) -> Result<(), CaseError> {
        let deadline = std::time::Instant::now() + ANSWER * 2;
        loop {
            if std::time::Instant::now() > deadline {
                return Err(fail(
                    "the client's link to go quiet after its start",
                    "cells for 10 s",
                ));
            }
            match self.link.recv(crate::link::QUIET) {
                Got::Cell(c) if c.command == cmd::CREATE_FAST => {
                    self.link.answer_create_fast(&c, true)?
                }
                Got::Cell(_) => {}
                Got::Nothing => return Ok(()),
                Got::Closed(why) => {
                    return Err(fail(
                        "the client's link to stay up",
                        format!("it closed ({why})"),
                    ))
                }
            }
        }
    }

    /// Answers CREATE_FASTs (rightly) until a BEGIN comes, and returns it.
    pub fn await_begin(&mut self) -> Result<Begin, CaseError> {
        self.begin_within(ANSWER)?
            .ok_or_else(|| fail("BEGIN from the client", "nothing"))
    }

    /// As `await_begin`, but `None` if no BEGIN comes within `wait`.
    pub fn begin_within(&mut self, wait: Duration) -> Result<Option<Begin>, CaseError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self
                .link
                .recv(deadline.saturating_duration_since(std::time::Instant::now()))
            {
                Got::Cell(c) if c.command == cmd::CREATE_FAST => {
                    self.link.answer_create_fast(&c, true)?
                }
                Got::Cell(c) => match c.relay() {
                    Some((relay_cmd::BEGIN, stream, body)) => {
                        return Ok(Some(Begin {
                            circ: c.circ,
                            stream,
                            payload: body.to_vec(),
                        }))
                    }
                    _ if crate::link::is_padding(&c) => {}
                    Some((relay_cmd::SENDME | relay_cmd::DROP, _, _)) => {}
                    _ => return Err(fail("BEGIN from the client", describe(&c))),
                },
                Got::Nothing => return Ok(None),
                Got::Closed(why) => {
                    return Err(fail(
                        "BEGIN from the client",
                        format!("the link closed ({why})"),
                    ))
                }
            }
        }
    }

    /// Answers CREATE_FASTs until a cell `want` accepts comes.
    pub fn await_cell(
        &mut self,
        what: &str,
        want: impl Fn(&Cell) -> bool,
    ) -> Result<Cell, CaseError> {
        let deadline = std::time::Instant::now() + ANSWER;
        loop {
            match self
                .link
                .recv(deadline.saturating_duration_since(std::time::Instant::now()))
            {
                Got::Cell(c) if want(&c) => return Ok(c),
                Got::Cell(c) if c.command == cmd::CREATE_FAST => {
                    self.link.answer_create_fast(&c, true)?
                }
                Got::Cell(c) if crate::link::is_padding(&c) => {}
                Got::Cell(c) if matches!(c.relay(), Some((relay_cmd::SENDME, _, _))) => {}
                Got::Cell(c) => return Err(fail(what, describe(&c))),
                Got::Nothing => return Err(fail(what, "nothing")),
                Got::Closed(why) => return Err(fail(what, format!("the link closed ({why})"))),
            }
        }
    }
}
