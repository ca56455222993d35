//! Tests that need addresses other than loopback. Each makes a network
//! namespace of its own (`ip netns add`), gives it a veth pair with
//! documentation addresses on one end (192.0.2.0/24, 198.51.100.0/24,
//! 2001:db8::/32: nothing answers them, and the namespace has no route
//! out), runs the
//! daemon in it (`ip netns exec`) and talks to it from a thread that has
//! joined the namespace (setns). The namespace is removed when the test
//! ends, however it ends. They need root, as CI has.

use crate::app::sha;
use crate::util::*;
use crate::wire::{describe, linked, next, ping};
use halfpipe_proto::relay::{end_reason, relay_cmd};
use socket2::{Domain, Socket, Type};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread;

/// A network namespace for one test, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("hp-{tag}-{}", std::process::id());
        // A namespace left by a killed run of this test is replaced.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    /// `ip -n NAME ARGS`, which must succeed.
    fn ip(&self, args: &str) {
        let mut all = vec!["-n", &self.name];
        all.extend(args.split_whitespace());
        run("ip", &all);
    }

    /// `/etc/hosts` for processes started with `wrapper` (`ip netns exec`
    /// bind-mounts the files of /etc/netns/NAME over those of /etc).
    fn hosts(&self, text: &str) {
        let dir = format!("/etc/netns/{}", self.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/hosts"), text).unwrap();
    }

    /// The command line that runs a program in the namespace.
    fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Moves the calling thread into the namespace: the sockets it makes
    /// from now on are the namespace's.
    fn enter(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        // SAFETY: setns with a valid namespace descriptor; it changes
        // only the calling thread's network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A listener on every address of the namespace for one family.
fn listen_everywhere(v6: bool) -> TcpListener {
    let (domain, any) = if v6 {
        (Domain::IPV6, "[::]:0")
    } else {
        (Domain::IPV4, "0.0.0.0:0")
    };
    let s = Socket::new(domain, Type::STREAM, None).unwrap();
    if v6 {
        s.set_only_v6(true).unwrap();
    }
    s.bind(&any.parse::<SocketAddr>().unwrap().into()).unwrap();
    s.listen(16).unwrap();
    s.into()
}

/// The END reason a BEGIN to `target` gets.
fn end_reason_for(l: &mut RawLink, circ: u32, sid: u16, target: &str) -> u8 {
    l.send_relay(circ, relay_cmd::BEGIN, sid, &begin_body(target));
    let c = next(l);
    match relay_of(&c) {
        Some((relay_cmd::END, s, body)) if s == sid && c.circ == circ => body[0],
        _ => panic!("BEGIN {target}: expected END, got {}", describe(&c)),
    }
}

#[test]
fn private_covers_the_exit_hosts_own_addresses_in_every_spelling() {
    // The attack: BEGIN to the exit host's own public address reached a
    // service listening on all addresses there, though the default policy
    // says `reject private:*`. The exit here has 192.0.2.77 and
    // 2001:db8::77 on an interface, and a service listens on every
    // address: each spelling of its own addresses (IPv4, IPv4-mapped and
    // IPv4-compatible IPv6, hex, decimal and octal names, names in
    // /etc/hosts) is END(EXITPOLICY), as loopback is; a neighbour on the
    // same network is not (END(TIMEOUT): nothing answers it); and an
    // address added while the exit runs is refused from the next BEGIN.
    let ns = Netns::new("own");
    ns.ip("link set lo up");
    ns.ip("link add hp0 type veth peer name hp1");
    ns.ip("addr add 192.0.2.77/24 dev hp0");
    ns.ip("addr add 2001:db8::77/64 dev hp0 nodad");
    ns.ip("link set hp0 up");
    ns.ip("link set hp1 up");
    ns.hosts("127.0.0.1 localhost\n192.0.2.77 own.example\n2001:db8::77 own6.example\n");
    let d = Daemon::start_under(
        &ns.wrapper(),
        &["exit", "--listen", "127.0.0.1:0", "--connect-timeout", "1s"],
        false,
        true,
    );
    thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            let v4 = listen_everywhere(false);
            let v6 = listen_everywhere(true);
            let (p, q) = (
                v4.local_addr().unwrap().port(),
                v6.local_addr().unwrap().port(),
            );
            let circ = fresh_circ();
            let mut l = linked(&d, circ);
            let own = [
                format!("192.0.2.77:{p}"),
                format!("[::ffff:192.0.2.77]:{p}"),
                format!("[::ffff:c000:24d]:{p}"),
                format!("[::192.0.2.77]:{p}"),
                format!("0xc000024d:{p}"),
                format!("3221226061:{p}"),
                format!("0300.0.2.0115:{p}"),
                format!("own.example:{p}"),
                format!("OWN.Example:{p}"),
                format!("[2001:db8::77]:{q}"),
                format!("[2001:0db8:0000:0000:0000:0000:0000:0077]:{q}"),
                format!("own6.example:{q}"),
            ];
            let mut sid = 0;
            for target in &own {
                sid += 1;
                let reason = end_reason_for(&mut l, circ, sid, target);
                assert_eq!(
                    reason,
                    end_reason::EXITPOLICY,
                    "BEGIN {target}: END({})",
                    end_reason::name(reason)
                );
            }
            // A neighbour is not the host: the policy lets it through, and
            // nothing answers it.
            sid += 1;
            let reason = end_reason_for(&mut l, circ, sid, &format!("192.0.2.78:{p}"));
            assert_eq!(reason, end_reason::TIMEOUT, "{}", end_reason::name(reason));
            // An address added while the exit runs: not the host's yet (no
            // route), then the host's.
            let added = format!("198.51.100.7:{p}");
            sid += 1;
            let before = end_reason_for(&mut l, circ, sid, &added);
            assert_ne!(before, end_reason::EXITPOLICY);
            // The kernel queues its notification of the new address before
            // `ip` returns, so the very next BEGIN sees it.
            ns.ip("addr add 198.51.100.7/32 dev hp0");
            sid += 1;
            let after = end_reason_for(&mut l, circ, sid, &added);
            assert_eq!(after, end_reason::EXITPOLICY, "{}", end_reason::name(after));
            ping(&mut l, circ);
            for listener in [&v4, &v6] {
                listener.set_nonblocking(true).unwrap();
                assert!(
                    listener.accept().is_err(),
                    "the service on the host was reached"
                );
            }
        })
        .join()
        .unwrap();
    });
    assert!(d.log().contains("covers this host's"), "{}", d.log());
}

#[test]
fn a_tls_link_between_two_namespaces_carries_curl_and_nc_half_close() {
    // docs/protocol.md §13 across a link that leaves the host: the exit in
    // one namespace, the client in another, a veth pair between them
    // (192.0.2.1 and 192.0.2.2). curl downloads through SOCKS, nc -N sends
    // a request and half-closes, and the target answers only after EOF:
    // every byte checked by SHA-256. A plain exit on that address warns.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: creating network namespaces needs root");
        return;
    }
    let a = Netns::new("tls-exit");
    let b = Netns::new("tls-client");
    a.ip("link set lo up");
    b.ip("link set lo up");
    a.ip("link add hpx type veth peer name hpc");
    a.ip(&format!("link set hpc netns {}", b.name));
    a.ip("addr add 192.0.2.1/24 dev hpx");
    a.ip("link set hpx up");
    b.ip("addr add 192.0.2.2/24 dev hpc");
    b.ip("link set hpc up");

    // The targets, on the exit's side.
    let body = std::sync::Arc::new(pattern(3 * (1 << 20) + 17, 9));
    let (web, digest) = thread::scope(|s| {
        s.spawn(|| {
            a.enter();
            let body = body.clone();
            let web = Server::start(move |mut c| {
                use std::io::{Read, Write};
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let _ = write!(
                    c,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(&body);
            });
            let digest = Server::request_reply(|req| {
                let hex: String = sha(req).iter().map(|b| format!("{b:02x}")).collect();
                format!("{} {hex}\n", req.len()).into_bytes()
            });
            (web, digest)
        })
        .join()
        .unwrap()
    });

    let exit = Daemon::start_under(
        &a.wrapper(),
        &[
            "exit",
            "--listen",
            "192.0.2.1:0",
            "--exit-policy",
            "accept 127.0.0.1:*",
        ],
        false,
        true,
    );
    assert!(is_tls_exit(exit.link()), "{}", exit.stdout());
    let client = Daemon::start_under(
        &b.wrapper(),
        &[
            "client",
            "--socks",
            "127.0.0.1:0",
            "--exit",
            &exit.link().to_string(),
        ],
        true,
        false,
    );
    exit.wait_for_log("peer=192.0.2.2:");
    let socks = client.socks().to_string();

    let mut curl = vec![
        "netns",
        "exec",
        &b.name,
        "curl",
        "-sS",
        "--fail",
        "--max-time",
        "20",
    ];
    let url = format!("http://127.0.0.1:{}/file", web.addr.port());
    curl.extend(["--socks5-hostname", &socks, &url]);
    let out = Command::new("ip").args(&curl).output().unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), body.len());
    assert_eq!(sha(&out.stdout), sha(&body), "curl's download differs");

    let request = pattern(2 * (1 << 20) + 5, 21);
    let port = digest.addr.port().to_string();
    let mut nc = Command::new("ip")
        .args([
            "netns", "exec", &b.name, "nc", "-N", "-X", "5", "-x", &socks,
        ])
        .args(["127.0.0.1", &port])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = nc.stdin.take().unwrap();
        stdin.write_all(&request).unwrap();
    }
    let out = nc.wait_with_output().unwrap();
    let hex: String = sha(&request).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{} {hex}\n", request.len()),
        "the answer after nc's half-close"
    );
    drop(client);
    drop(exit);

    let plain = Daemon::start_under(
        &a.wrapper(),
        &["exit", "--listen", "192.0.2.1:0", "--link", "plain"],
        false,
        true,
    );
    plain.wait_for_log("--link plain on a link that leaves this host");
}
