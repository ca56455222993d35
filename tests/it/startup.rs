//! What a new user meets first: start-up, the examples of the README, and
//! the lines the daemon prints and logs (docs/operations.md).

use crate::util::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `halfpipe ARGS` until it exits (within `PATIENCE`): its status,
/// stdout and stderr. Colour is not switched off: stderr is a pipe.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start halfpipe");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("halfpipe {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), out, err)
}

#[test]
fn a_busy_status_port_is_an_error_before_anything_is_announced() {
    // Every listener is bound before a "listening" line is printed: a port
    // in use is one error line and exit status 2, not a half-started daemon.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let status = busy.local_addr().unwrap().to_string();
    let (code, out, err) = run_to_exit(&["run", "--socks", "127.0.0.1:0", "--status", &status]);
    assert_eq!(code, Some(2), "stdout: {out}\nstderr: {err}");
    assert!(!out.contains("listening"), "announced anyway: {out}");
    assert!(err.contains(&status), "the error names the address: {err}");
}

#[test]
fn logs_have_no_colour_when_stderr_is_not_a_terminal() {
    // Log files and the journal get plain text, even without NO_COLOR.
    let mut d = Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args(["exit", "--listen", "127.0.0.1:0", "--log", "debug"])
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once it is up (its listening line), stop it (SIGTERM) and read what
    // it logged from start to stop.
    // (stdout stays open until it has exited: its lines must not hit a
    // closed pipe.)
    let mut stdout = std::io::BufReader::new(d.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.starts_with("capacity:"), "{line}");
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let mut log = String::new();
    d.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    d.wait().unwrap();
    drop(stdout);
    assert!(log.contains("halfpipe stopped"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a piped log: {log:?}"
    );
}

#[test]
fn the_readmes_two_daemons_reach_a_local_target() {
    // The README's example: an exit whose policy admits 127.0.0.1 only, a
    // client linked to it, and a request through the client's SOCKS port
    // to a local server. (The client names the exit by a name here, which
    // it resolves when it dials.)
    let target = Server::request_reply(|req: &[u8]| {
        let mut r = b"reply to ".to_vec();
        r.extend_from_slice(req);
        r
    });
    let exit = Daemon::exit(&["--exit-policy", "accept 127.0.0.1:*"]);
    let by_name = format!("localhost:{}", exit.link().port());
    // `--exit-fingerprint $(halfpipe exit --print-fingerprint)`.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args(["exit", "--print-fingerprint"])
        .env("XDG_DATA_HOME", data_home())
        .output()
        .unwrap();
    let fp = String::from_utf8(out.stdout).unwrap();
    let client = Daemon::client_to(&by_name, &["--exit-fingerprint", fp.trim_end()]);
    let mut s = socks5(client.socks(), "127.0.0.1", target.addr.port(), None).expect("CONNECT");
    s.write_all(b"hello").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"reply to hello");
    // Anything else stays refused, and the exit says why at info level,
    // naming the target and the entry that decided (the default refusal:
    // no entry matches).
    let other = TcpListener::bind("127.0.0.2:0").unwrap();
    let port = other.local_addr().unwrap().port();
    assert_eq!(
        socks5(client.socks(), "127.0.0.2", port, None).err(),
        Some(0x02)
    );
    exit.wait_for_log(&format!("exit policy refuses 127.0.0.2:{port}"));
    let log = exit.log();
    let line = log
        .lines()
        .find(|l| l.contains("exit policy refuses 127.0.0.2"))
        .unwrap();
    assert!(
        line.contains(" INFO ") && line.contains("no entry matches"),
        "{line}"
    );
}

#[test]
fn sighup_reloads_the_exit_policy_and_no_signal_but_term_stops_the_daemon() {
    // SIGHUP re-reads the config file and applies what can change live
    // (the exit policy, the log filter); it never stops the daemon, nor
    // does SIGUSR2. SIGTERM still stops it gracefully (exit status 0).
    let target = Server::echo();
    let path = std::env::temp_dir().join(format!("halfpipe-sighup-{}.toml", std::process::id()));
    std::fs::write(&path, "exit-policy = \"reject *:*\"\n").unwrap();
    let file = path.to_str().unwrap();
    let mut exit = Daemon::exit(&["--config", file]);
    let client = Daemon::client(exit.link(), &[]);
    let port = target.addr.port();
    assert_eq!(
        socks5(client.socks(), "127.0.0.1", port, None).err(),
        Some(0x02)
    );
    std::fs::write(
        &path,
        "exit-policy = \"accept 127.0.0.1:*\"\nlog = \"debug\"\n",
    )
    .unwrap();
    exit.signal(libc::SIGHUP);
    exit.wait_for_log("SIGHUP: exit policy now accept 127.0.0.1:*");
    // (The tests set RUST_LOG, which wins over the file's filter.)
    exit.wait_for_log("SIGHUP: RUST_LOG is set, so the log filter stays");
    let mut s = socks5(client.socks(), "127.0.0.1", port, None).expect("allowed now");
    s.write_all(b"hi").unwrap();
    let mut got = [0u8; 2];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi");
    drop(s);
    // A file that no longer parses changes nothing.
    std::fs::write(&path, "exit-policy = \"allow all\"\n").unwrap();
    exit.signal(libc::SIGHUP);
    exit.wait_for_log("the settings in force stay");
    exit.signal(libc::SIGUSR2);
    exit.wait_for_log("SIGUSR2 ignored");
    assert!(exit.is_running());
    std::fs::remove_file(&path).unwrap();
    exit.signal(libc::SIGTERM);
    assert!(exit.wait_exit(PATIENCE).success());
}
