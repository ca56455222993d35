//! TLS links (docs/protocol.md §13) between real daemons, checked from
//! outside with openssl s_client, relays that record and tamper with the
//! bytes on the path, and peers that get the handshake wrong. The suites
//! of hostile.rs and faults.rs run over TLS links as well as plain ones;
//! the netns test carries TLS links between two network namespaces.

use crate::app::*;
use crate::hostile::{Baseline, Bystander, Rng};
use crate::status::streams_doc;
use crate::util::*;
use crate::wire::*;
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- helpers

/// A data directory of its own (a second identity), under the test
/// process's data home.
fn fresh_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = data_home().join(format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `halfpipe ROLE --print-fingerprint --data-dir DIR`: its stdout.
fn print_fingerprint(role: &str, dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args([role, "--print-fingerprint", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// `halfpipe ARGS`, which must refuse to start (status 2): its stderr.
fn start_refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args(args)
        .env("XDG_DATA_HOME", data_home())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "halfpipe {args:?}: {err}");
    err
}

/// `openssl s_client -connect ADDR ARGS`, fed `input` (then EOF, which
/// ends it unless ARGS keep it open): (stdout, stderr) once it exits, or
/// once `enough` says stdout is complete, or after PATIENCE.
fn s_client(
    addr: SocketAddr,
    args: &[&str],
    input: &[u8],
    enough: impl Fn(&[u8]) -> bool,
) -> (Vec<u8>, String) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl (scripts/test.sh installs it)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    // Kept open while we wait for an answer if ARGS ignore EOF.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let out = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let out = out.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    drop(stdin);
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none()
        && !enough(&out.lock().unwrap())
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap();
    let out = out.lock().unwrap().clone();
    (out, err.join().unwrap())
}

/// SHA-256 of the DER SubjectPublicKeyInfo of the certificate in `pem`,
/// as openssl computes it: the fingerprint of R13.4, from outside.
fn spki_sha256_of_pem(pem: &str) -> String {
    let pubkey = pipe(&["openssl", "x509", "-pubkey", "-noout"], pem.as_bytes());
    let der = pipe(&["openssl", "pkey", "-pubin", "-outform", "DER"], &pubkey);
    hex(&Sha256::digest(&der))
}

fn pipe(cmd: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd:?}");
    out.stdout
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first certificate in s_client's `-showcerts` output.
fn first_cert(text: &str) -> String {
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = text[start..].find("-----END CERTIFICATE-----").unwrap() + start + 25;
    text[start..end].to_owned() + "\n"
}

/// A VERSIONS cell offering 4, and the exit's answer.
const VERSIONS: [u8; 7] = [0, 0, 7, 0, 2, 0, 4];

/// The start of a real ClientHello of a halfpipe client.
fn client_hello() -> Vec<u8> {
    let fp = test_fingerprint().parse().unwrap();
    let config = halfpipe::link::tls::client_config(test_identity(), fp);
    let mut conn = rustls::ClientConnection::new(config, "127.0.0.1".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// The failure counter of one reason in a daemon's /metrics.
fn tls_failures(d: &Daemon, reason: &str) -> f64 {
    metric_value(
        &metrics_text(d),
        &format!("halfpipe_tls_handshake_failures_total{{reason=\"{reason}\"}}"),
    )
}

fn wait_failures(d: &Daemon, reason: &str, at_least: f64) {
    eventually(&format!("{reason} counted in /metrics"), || {
        (tls_failures(d, reason) >= at_least).then_some(())
    });
}

/// Echoes `text` through a new SOCKS stream of `client`.
fn echo_through(client: &Daemon, server: &Server, text: &str) {
    let mut s = open(client, server.addr.port());
    s.write_all(text.as_bytes()).unwrap();
    assert_eq!(read_n(&mut s, text.len()), text.as_bytes());
}

/// The status document's entry for the daemon's only link.
fn only_link(d: &Daemon) -> serde_json::Value {
    let doc = streams_doc(d);
    let links = doc["links"].as_array().unwrap().clone();
    assert_eq!(links.len(), 1, "{doc}");
    links[0].clone()
}

// ------------------------------------------------------------- identities

#[test]
fn the_fingerprint_is_the_sha256_of_the_key_the_exit_shows() {
    // R13.4: the exit shows its identity key in its certificate, and its
    // fingerprint is the SHA-256 of that key's DER SubjectPublicKeyInfo,
    // computed here by openssl from what s_client received. R13.7: an exit
    // without --authorized-clients asks no certificate of s_client and
    // carries cells for it (R13.3: VERSIONS inside TLS, after ALPN
    // halfpipe/1, R13.2).
    let dir = fresh_dir("print");
    let fp = print_fingerprint("exit", &dir);
    assert_eq!(fp.len(), 65, "64 hex digits and a newline: {fp:?}");
    let fp = fp.trim_end().to_owned();
    assert!(fp
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    let key = dir.join("identity.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "identity.key has mode {mode:o}");
    // The same key, the same fingerprint, whichever role reads it.
    assert_eq!(print_fingerprint("exit", &dir).trim_end(), fp);
    assert_eq!(print_fingerprint("client", &dir).trim_end(), fp);

    let dir_arg = dir.display().to_string();
    let exit = Daemon::exit(&["--data-dir", &dir_arg]);
    assert!(exit.stdout().contains(&format!("fingerprint: {fp}\n")));
    exit.wait_for_log(&format!("identity fingerprint {fp}"));

    let (out, err) = s_client(
        exit.link(),
        &["-alpn", "halfpipe/1", "-showcerts", "-ign_eof"],
        &VERSIONS,
        |out| out.windows(7).any(|w| w == VERSIONS),
    );
    let text = String::from_utf8_lossy(&out);
    assert_eq!(spki_sha256_of_pem(&first_cert(&text)), fp, "{text}\n{err}");
    assert!(text.contains("TLSv1.3"), "{text}");
    assert!(text.contains("ALPN protocol: halfpipe/1"), "{text}");
    // The exit's VERSIONS, decrypted by s_client: the link is up.
    assert!(
        out.windows(7).any(|w| w == VERSIONS),
        "no VERSIONS answer through TLS:\n{text}\n{err}"
    );
}

#[test]
fn a_corrupt_key_stops_the_start_and_a_client_without_a_pin_says_what_to_do() {
    // Never a silent new identity: a key that does not parse is an error
    // that names the file, and the file is left as it was.
    let dir = fresh_dir("corrupt");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("identity.key");
    std::fs::write(&key, "not a key\n").unwrap();
    let dir = dir.display().to_string();
    let err = start_refused(&["exit", "--listen", "127.0.0.1:0", "--data-dir", &dir]);
    assert!(err.contains(&key.display().to_string()), "{err}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "not a key\n");
    // A client with no --exit-fingerprint is told how to get one.
    let err = start_refused(&["client", "--exit", "127.0.0.1:9"]);
    assert!(err.contains("--print-fingerprint"), "{err}");
}

// ------------------------------------------------------------ the session

#[test]
fn the_edges_link_over_tls_13_and_status_shows_the_session() {
    // R13.1: TLS 1.3; R13.8: the client shows its identity when the exit
    // asks (here it must: the exit lists it); the status documents of both
    // edges name the suite and the peer's fingerprint, and `halfpipe
    // status` prints them. SSLKEYLOGFILE is honoured.
    let keylog = fresh_dir("keylog");
    std::fs::create_dir_all(&keylog).unwrap();
    let keylog = keylog.join("keys.txt");
    let list = fresh_dir("list");
    std::fs::create_dir_all(&list).unwrap();
    let list = list.join("clients");
    std::fs::write(
        &list,
        format!("# the test client\n{}\n", test_fingerprint()),
    )
    .unwrap();
    let exit = Daemon::start_under(
        &["env", &format!("SSLKEYLOGFILE={}", keylog.display())],
        &[
            "exit",
            "--listen",
            "127.0.0.1:0",
            "--exit-policy",
            "accept *:*",
            "--authorized-clients",
            list.to_str().unwrap(),
            "--status",
            "127.0.0.1:0",
        ],
        false,
        true,
    );
    let client = Daemon::client(exit.link(), &["--status", "127.0.0.1:0"]);
    let server = Server::echo();
    echo_through(&client, &server, "through TLS");

    for (d, peer) in [(&client, test_fingerprint()), (&exit, test_fingerprint())] {
        let l = only_link(d);
        assert_eq!(l["transport"], "tls", "{l}");
        assert_eq!(l["tls_version"], "TLSv1.3", "{l}");
        assert_eq!(l["cipher_suite"], "TLS_AES_128_GCM_SHA256", "{l}");
        assert_eq!(l["peer_fingerprint"], peer, "{l}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_halfpipe"))
        .args(["status", "--status", &client.status.unwrap().to_string()])
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table
        .lines()
        .find(|l| l.contains("TLS_AES_128_GCM_SHA256"))
        .unwrap_or_else(|| panic!("no link row with the suite:\n{table}"));
    assert!(
        row.contains("TLSv1.3") && row.contains(test_fingerprint()),
        "{table}"
    );
    exit.wait_for_log(&format!("client={}", test_fingerprint()));

    let keys = std::fs::read_to_string(&keylog).unwrap();
    for label in ["CLIENT_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0"] {
        assert!(
            keys.contains(label),
            "SSLKEYLOGFILE has no {label}:\n{keys}"
        );
    }
}

// ------------------------------------------------------------ pinning

#[test]
fn a_wrong_fingerprint_ends_the_link_before_any_cell_and_socks_fails_at_once() {
    // R13.5: a client pinned to another key aborts the handshake: it logs
    // both fingerprints, counts it, fails SOCKS requests at once (0x01),
    // and keeps retrying with its backoff. The exit never sees a cell.
    let mut exit = Daemon::exit(&["--status", "127.0.0.1:0"]);
    let before = Baseline::take(&exit);
    let wrong = "0".repeat(64);
    let client = client_unlinked_to(&exit, &["--exit-fingerprint", &wrong]);
    client.wait_for_log(&format!(
        "the exit's fingerprint is {}, not {wrong}",
        test_fingerprint()
    ));
    let socks = client.socks();
    assert_eq!(socks5(socks, "127.0.0.1", 80, None).unwrap_err(), 0x01);
    // Retried: a second refusal is counted.
    wait_failures(&client, "wrong_exit", 2.0);
    wait_failures(&exit, "refused_by_client", 1.0);
    assert!(!exit.log().contains("link opened"), "{}", exit.log());
    assert!(!client.log().contains("link to exit ready"));
    drop(client);
    before.assert_recovered(&mut exit, "refused handshakes of a wrong pin");
}

// ------------------------------------------------------- authorized clients

#[test]
fn an_exit_serves_only_listed_clients_and_rereads_the_list_on_sighup() {
    // R13.7: with --authorized-clients, the exit requires a certificate
    // and refuses keys it does not list, during the handshake; SIGHUP
    // re-reads the file, closing only the links of clients no longer
    // listed. A malformed file stops the start naming its line.
    let other_dir = fresh_dir("other");
    let other = print_fingerprint("client", &other_dir)
        .trim_end()
        .to_owned();
    let list = fresh_dir("listed");
    std::fs::create_dir_all(&list).unwrap();
    let list = list.join("clients");
    std::fs::write(&list, "not a fingerprint\n").unwrap();
    let err = start_refused(&[
        "exit",
        "--listen",
        "127.0.0.1:0",
        "--authorized-clients",
        list.to_str().unwrap(),
    ]);
    assert!(err.contains("line 1"), "{err}");

    std::fs::write(&list, format!("# only the other client\n{other}\n")).unwrap();
    let mut exit = Daemon::exit(&[
        "--exit-policy",
        "accept *:*",
        "--authorized-clients",
        list.to_str().unwrap(),
        "--status",
        "127.0.0.1:0",
    ]);
    let server = Server::echo();
    let other_arg = other_dir.display().to_string();
    let b = Daemon::client(exit.link(), &["--data-dir", &other_arg]);
    echo_through(&b, &server, "a listed client");
    let a = client_unlinked_to(&exit, &exit.link_args());
    a.wait_for_log("the exit refused this client");
    exit.wait_for_log(&format!(
        "client {} is not in --authorized-clients",
        test_fingerprint()
    ));
    wait_failures(&exit, "unlisted_client", 2.0);
    assert_eq!(socks5(a.socks(), "127.0.0.1", 80, None).unwrap_err(), 0x01);
    // Refused handshakes hold nothing: B's link is the only one.
    eventually("the exit holds B's link only", || {
        let doc = streams_doc(&exit);
        (doc["links"].as_array()?.len() == 1).then_some(())
    });
    // openssl with no certificate: refused too. (TLS 1.3 refuses a client
    // certificate after the client's side of the handshake is done: s_client
    // waits for the answer to a VERSIONS cell, and gets the alert.)
    let (out, err) = s_client(
        exit.link(),
        &["-alpn", "halfpipe/1", "-ign_eof"],
        &VERSIONS,
        |_| false,
    );
    assert!(
        !out.windows(7).any(|w| w == VERSIONS),
        "VERSIONS without a certificate"
    );
    let text = String::from_utf8_lossy(&out);
    assert!(
        err.contains("certificate required") || text.contains("certificate required"),
        "{text}\n{err}"
    );

    // Swap the list: A in, B out.
    std::fs::write(&list, format!("{}\n", test_fingerprint())).unwrap();
    exit.signal(libc::SIGHUP);
    exit.wait_for_log("SIGHUP: serving the 1 clients listed");
    exit.wait_for_log(&format!("client={other}"));
    exit.wait_for_log("client no longer listed: closing its link");
    b.wait_for_log("link to exit lost");
    // Closed with a close_notify (R13.10), not a bare FIN.
    b.wait_for_log("link closed: closed by peer");
    eventually("client A links", || {
        a.log().contains("link to exit ready").then_some(())
    });
    echo_through(&a, &server, "listed after SIGHUP");
    // B is refused from now on; A's link is untouched by a second SIGHUP.
    b.wait_for_log("the exit refused this client");
    exit.signal(libc::SIGHUP);
    exit.wait_for_log("SIGHUP: serving the 1 clients listed");
    echo_through(&a, &server, "after a second SIGHUP");
    assert_eq!(a.log_count("link to exit ready"), 1, "{}", a.log());
    assert!(exit.is_running());
}

/// A client of `exit` (with `extra`, and `--status`) that may not get its
/// link: it waits for its SOCKS address only.
fn client_unlinked_to(exit: &Daemon, extra: &[&str]) -> Daemon {
    let link = exit.link().to_string();
    let mut args = vec!["client", "--socks", "127.0.0.1:0", "--exit", &link];
    args.extend(["--status", "127.0.0.1:0"]);
    args.extend_from_slice(extra);
    let mut d = Daemon::start(&args, false, false);
    d.socks = Some(eventually("the client's SOCKS line", || {
        let out = d.stdout();
        let rest = &out[out.find("SOCKS listening on ")? + 19..];
        rest.split_whitespace().next()?.parse().ok()
    }));
    d
}

// --------------------------------------------- peers that get TLS wrong

#[test]
fn tls_12_and_a_missing_alpn_are_refused() {
    // R13.1: no TLS 1.2; R13.2: no halfpipe/1 in ALPN, no link.
    let exit = Daemon::exit(&["--status", "127.0.0.1:0"]);
    let (out, err) = s_client(
        exit.link(),
        &["-tls1_2", "-alpn", "halfpipe/1"],
        b"",
        |_| false,
    );
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("Cipher is (NONE)"),
        "a TLS 1.2 session: {text}"
    );
    assert!(err.contains("alert protocol version"), "{text}\n{err}");
    let (out, err) = s_client(exit.link(), &["-ign_eof"], &VERSIONS, |_| false);
    assert!(
        !out.windows(7).any(|w| w == VERSIONS),
        "a VERSIONS answer without ALPN"
    );
    exit.wait_for_log("did not offer ALPN");
    wait_failures(&exit, "no_alpn", 1.0);
    // The exit closed what s_client thinks is a session: no cell is read.
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("No ALPN negotiated"), "{text}\n{err}");
}

#[test]
fn garbage_a_stalled_handshake_and_200_half_done_ones_get_their_answers() {
    // Each gets its answer within the handshake timeout (R13.3 with R1.6)
    // and holds nothing after: garbage instead of a ClientHello is closed
    // (with at most a TLS alert); a plain VERSIONS is closed, logged as a
    // plain peer; a ClientHello that stops half-way is closed at the
    // timeout, not before; 200 of them at once leave the bystander served
    // and threads and RSS back at their baseline.
    let mut d = open_exit(&["--handshake-timeout", "2s", "--status", "127.0.0.1:0"]);
    let mut by = Bystander::new(&d);
    let before = Baseline::take(&d);

    // Failure logs are rate-limited: the two logged cases go first.
    let mut s = TcpStream::connect(d.link()).unwrap();
    s.write_all(&VERSIONS).unwrap();
    assert!(read_until_closed(&mut s).is_empty());
    d.wait_for_log("the peer speaks a plain link");
    wait_failures(&d, "plain_peer", 1.0);

    let hello = client_hello();
    let half = &hello[..hello.len() / 2];
    let mut s = TcpStream::connect(d.link()).unwrap();
    s.write_all(half).unwrap();
    let since = Instant::now();
    assert!(read_until_closed(&mut s).is_empty());
    let at = since.elapsed();
    assert!(at >= Duration::from_millis(1_900), "closed after {at:?}");
    d.wait_for_log("no TLS handshake within 2s");
    wait_failures(&d, "timeout", 1.0);

    let mut rng = Rng(7);
    for _ in 0..20 {
        let mut s = TcpStream::connect(d.link()).unwrap();
        let _ = s.write_all(&rng.bytes(16 * 1024));
        let got = read_until_closed(&mut s);
        assert!(
            got.is_empty() || got[0] == 0x15,
            "garbage got {} bytes that are not an alert",
            got.len()
        );
    }
    wait_failures(&d, "other", 20.0);
    by.check("after garbage");

    let many: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(d.link()).unwrap();
            let _ = s.write_all(half);
            s
        })
        .collect();
    by.check("during 200 half-done handshakes");
    let since = Instant::now();
    for mut s in many {
        assert!(read_until_closed(&mut s).is_empty());
    }
    eprintln!(
        "200 half-done handshakes closed within {:?}",
        since.elapsed()
    );
    wait_failures(&d, "timeout", 2.0);
    by.check("after 200 half-done handshakes");
    before.assert_recovered(&mut d, "200 half-done TLS handshakes");
}

#[test]
fn a_versions_record_dribbled_inside_tls_is_cut_at_the_handshake_deadline() {
    // R13.3 with R1.6: the deadline covers VERSIONS inside TLS too. The TLS
    // handshake completes, then the record that carries VERSIONS arrives
    // one byte every half second (about 15 s in all): the exit closes the
    // link at its 2 s deadline, before the record is complete.
    let d = open_exit(&["--handshake-timeout", "2s"]);
    let tcp = TcpStream::connect(d.link()).unwrap();
    let fp = test_fingerprint().parse().unwrap();
    let config = halfpipe::link::tls::client_config(test_identity(), fp);
    let config = halfpipe::link::TlsConfig::Client(config);
    let since = Instant::now();
    let mut session =
        halfpipe::link::tls::handshake(&tcp, &config, since + PATIENCE, PATIENCE).unwrap();
    session.sealer.seal(&[VERSIONS.to_vec()]).unwrap();
    let record = session.sealer.take_records().concat();
    let sent = Arc::new(AtomicUsize::new(0));
    let dribbler = {
        let (mut s, sent) = (tcp.try_clone().unwrap(), sent.clone());
        thread::spawn(move || {
            for b in record {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let mut r = tcp.try_clone().unwrap();
    read_until_closed(&mut r);
    let at = since.elapsed();
    let dribbled = sent.load(Ordering::SeqCst);
    d.wait_for_log("no complete VERSIONS within 2s");
    assert!(at >= Duration::from_millis(1_900), "closed after {at:?}");
    eprintln!("dribbled VERSIONS record cut after {at:?} and {dribbled} bytes");
    let _ = tcp.shutdown(Shutdown::Both);
    dribbler.join().unwrap();
    assert!(
        dribbled < 20,
        "the link stayed open while {dribbled} bytes of the record dribbled in"
    );
}

// ---------------------------------------------------------- on the path

/// A TCP relay to `to`: every chunk passes through `tap(connection,
/// direction, offset, chunk)` on its way (direction 0: towards `to`).
/// Dropping it closes its listener and connections and joins its threads.
struct Relay {
    addr: SocketAddr,
    listener: TcpListener,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<thread::JoinHandle<()>>>>,
    accept: Option<thread::JoinHandle<()>>,
}

type Tap = dyn Fn(usize, usize, u64, &mut [u8]) + Send + Sync;

impl Relay {
    fn start(to: SocketAddr, tap: Arc<Tap>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let threads: Arc<Mutex<Vec<thread::JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (listener, conns, threads) = (
                listener.try_clone().unwrap(),
                conns.clone(),
                threads.clone(),
            );
            thread::spawn(move || {
                for (n, a) in listener.incoming().enumerate() {
                    let Ok(a) = a else { break };
                    // Nothing to relay to: dropping `a` closes it, as the
                    // exit itself would have refused it.
                    let Ok(b) = TcpStream::connect(to) else {
                        continue;
                    };
                    conns
                        .lock()
                        .unwrap()
                        .extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
                    for (dir, from, into) in [
                        (0, a.try_clone().unwrap(), b.try_clone().unwrap()),
                        (1, b, a),
                    ] {
                        let tap = tap.clone();
                        let copy = thread::spawn(move || relay_copy(n, dir, from, into, &*tap));
                        threads.lock().unwrap().push(copy);
                    }
                }
            })
        };
        Relay {
            addr,
            listener,
            conns,
            threads,
            accept: Some(accept),
        }
    }
}

/// One direction of a relayed connection, until either end closes.
fn relay_copy(n: usize, dir: usize, mut from: TcpStream, mut into: TcpStream, tap: &Tap) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = into.shutdown(Shutdown::Write);
                return;
            }
            Ok(k) => {
                tap(n, dir, off, &mut buf[..k]);
                off += k as u64;
                if into.write_all(&buf[..k]).is_err() {
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
            // A reset (or the relay's drop): pass it on.
            Err(_) => {
                let _ = into.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Wakes the accept() (Linux: shutdown of a listening socket).
        let _ = socket2::SockRef::from(&self.listener).shutdown(Shutdown::Both);
        if let Some(a) = self.accept.take() {
            a.join().unwrap();
        }
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
        for t in self.threads.lock().unwrap().drain(..) {
            t.join().unwrap();
        }
    }
}

#[test]
fn a_recording_relay_sees_tls_records_and_never_the_applications_bytes() {
    // R13.3: every cell is TLS application data: a marker sent through a
    // stream both ways never appears on the path, and each direction starts
    // with a TLS handshake record (0x16). Over a plain link the same
    // recording does show it (the check can fail).
    let marker = "halfpipe-marker-7f3a9c1e";
    for plain in [false, true] {
        let exit = if plain {
            Daemon::exit(&["--exit-policy", "accept *:*", "--link", "plain"])
        } else {
            Daemon::exit(&["--exit-policy", "accept *:*"])
        };
        let seen: Arc<Mutex<[Vec<u8>; 2]>> = Arc::default();
        let tap = {
            let seen = seen.clone();
            Arc::new(move |_: usize, dir: usize, _: u64, chunk: &mut [u8]| {
                seen.lock().unwrap()[dir].extend_from_slice(chunk);
            })
        };
        let relay = Relay::start(exit.link(), tap);
        let client = Daemon::client(relay.addr, &exit.link_args());
        let server = Server::echo();
        echo_through(&client, &server, &marker.repeat(100));
        let seen = seen.lock().unwrap().clone();
        let found = |d: usize| {
            seen[d]
                .windows(marker.len())
                .any(|w| w == marker.as_bytes())
        };
        if plain {
            assert!(found(0) && found(1), "a plain link shows the bytes");
        } else {
            assert!(
                !found(0) && !found(1),
                "the marker crossed the path in clear"
            );
            assert_eq!((seen[0][0], seen[1][0]), (0x16, 0x16));
            assert!(seen[0].len() > 2_400 && seen[1].len() > 2_400);
        }
    }
}

#[test]
fn a_flipped_bit_on_the_path_resets_streams_and_the_client_links_again() {
    // R13.9: one bit flipped after 1 MiB, in either direction: the record
    // fails authentication, the link is lost (R3.13): the application gets
    // a reset and never a corrupted byte; the client links again; another
    // client's link to the same exit carries on.
    let server = payload_server(Arc::new(AtomicUsize::new(0)));
    for dir in [1usize, 0] {
        let exit = Daemon::exit(&["--exit-policy", "accept *:*"]);
        let tap = Arc::new(move |conn: usize, d: usize, off: u64, chunk: &mut [u8]| {
            let at = MIB as u64 + 1000;
            if conn == 0 && d == dir && off <= at && at < off + chunk.len() as u64 {
                chunk[(at - off) as usize] ^= 0x10;
            }
        });
        let relay = Relay::start(exit.link(), tap);
        let client = Daemon::client(relay.addr, &exit.link_args());
        let other = Daemon::client(exit.link(), &[]);
        let mut bystander = open(&other, server.addr.port());
        bystander.write_all(&payload_request(9, 4 * MIB)).unwrap();

        // More than crosses the path before the flipped bit, either way.
        let len = 64 * MIB;
        let mut s = open(&client, server.addr.port());
        // Towards the exit: the request, then a stream of bytes the target
        // never reads past its request (they cross the path all the same).
        s.write_all(&payload_request(dir as u32, len)).unwrap();
        let pusher = {
            let mut w = s.try_clone().unwrap();
            thread::spawn(move || {
                let chunk = vec![0x5au8; 64 * 1024];
                let mut sent = 0;
                while sent < 2 * MIB && w.write_all(&chunk).is_ok() {
                    sent += chunk.len();
                }
            })
        };
        let (got, end) = read_until_end(&mut s);
        pusher.join().unwrap();
        let err = end.expect_err("a reset, not EOF, when the link breaks");
        assert_eq!(
            err.kind(),
            io::ErrorKind::ConnectionReset,
            "direction {dir}"
        );
        assert!(got.len() < len, "direction {dir}: all {len} bytes arrived");
        let want: Vec<u8> = payload_chunks(dir as u32, got.len()).flatten().collect();
        assert!(
            got == want,
            "direction {dir}: a corrupted byte reached the application"
        );
        exit.wait_for_log("read error");

        eventually("the client links again", || {
            (client.log_count("link to exit ready") >= 2).then_some(())
        });
        let mut again = open(&client, server.addr.port());
        again.write_all(&payload_request(50, MIB)).unwrap();
        again.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            read_hashed(&mut again, "after the flip"),
            (MIB, payload_sha(50, MIB))
        );
        bystander.shutdown(Shutdown::Write).unwrap();
        let got = read_hashed(&mut bystander, "the other client");
        assert_eq!(got, (4 * MIB, payload_sha(9, 4 * MIB)), "direction {dir}");
        assert_eq!(other.log_count("link to exit ready"), 1);
    }
}

// ------------------------------------------------------------ closing

#[test]
fn close_notify_ends_a_link_cleanly_and_a_bare_fin_is_a_lost_link() {
    // R13.10: a peer that sends close_notify then FIN closed the link; a
    // FIN without close_notify is a lost link. Either way the circuits go
    // and their streams are reset (R3.13). A client that stops sends
    // close_notify.
    let d = open_exit(&[]);
    let t = Targets::new();
    for clean in [true, false] {
        let circ = fresh_circ();
        let mut l = linked(&d, circ);
        let mut target = open_stream(&mut l, circ, 1, &t);
        if clean {
            // The bridge sends close_notify before its FIN. The exit answers
            // in kind: the bridge passes a close_notify on as a FIN, and
            // anything else (a bare FIN, a reset) as a reset.
            l.sock.shutdown(Shutdown::Write).unwrap();
            d.wait_for_log("link closed: closed by peer");
            l.sock.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut rest = Vec::new();
            match l.sock.read_to_end(&mut rest) {
                Ok(_) => {}
                Err(e) => panic!("the exit did not answer with close_notify: {e}"),
            }
        } else {
            l.fin_without_close_notify();
            d.wait_for_log("close_notify");
        }
        expect_reset(&mut target);
    }
    let exit = Daemon::exit(&["--exit-policy", "accept *:*"]);
    let mut client = Daemon::client(exit.link(), &[]);
    let before = exit.log_count("link closed: closed by peer");
    client.signal(libc::SIGTERM);
    client.wait_exit(PATIENCE);
    eventually("the exit reads close_notify", || {
        (exit.log_count("link closed: closed by peer") > before).then_some(())
    });
}
