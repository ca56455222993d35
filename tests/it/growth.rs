//! The client grows instead of refusing (docs/protocol.md §11, the note
//! under R11.4): a full circuit sends a SOCKS request to another circuit
//! of its group, or a new one, and an exit that refuses circuits on a link
//! (R3.8) makes the client open another link. What is left, the most links
//! the client opens to its exit, is counted in /metrics.

use crate::util::*;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// The circuit ("C" of the stream name "C.S") that carries the client's
/// stream to `target`, from the client's debug log.
fn circuit_to(d: &Daemon, target: SocketAddr) -> String {
    let t = format!("target={target}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = d.log().lines().find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            if !l.contains("BEGIN sent") || !words.contains(&t.as_str()) {
                return None;
            }
            let stream = words.iter().find_map(|w| w.strip_prefix("stream="))?;
            Some(stream.split('.').next()?.to_owned())
        });
        if let Some(c) = found {
            return c;
        }
        assert!(Instant::now() < deadline, "no BEGIN sent for {target}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A SOCKS stream through `proxy` to an echo server, checked with a round
/// trip and held open.
fn held_echo(proxy: SocketAddr, server: &Server, user: Option<&str>) -> Result<TcpStream, u8> {
    let mut s = socks5(
        proxy,
        "127.0.0.1",
        server.addr.port(),
        user.map(|u| (u, "pw")),
    )?;
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    Ok(s)
}

#[test]
fn a_full_circuit_makes_the_client_open_another_of_the_same_group() {
    // A circuit takes 3 streams (`--max-streams-per-circuit 3`): 7 streams
    // without credentials and 4 of "alice" are all served, on 3 and 2
    // circuits, none of them shared between the two groups (R11.4), and no
    // request is refused.
    let exit = Daemon::exit(&["--exit-policy", "accept *:*"]);
    let client = Daemon::client(
        exit.link(),
        &["--max-streams-per-circuit", "3", "--status", "127.0.0.1:0"],
    );
    let users: Vec<Option<&str>> = [None; 7].into_iter().chain([Some("alice"); 4]).collect();
    let servers: Vec<Server> = users.iter().map(|_| Server::echo()).collect();
    let held: Vec<TcpStream> = users
        .iter()
        .zip(&servers)
        .map(|(u, s)| held_echo(client.socks(), s, *u).unwrap_or_else(|c| panic!("SOCKS {c:#04x}")))
        .collect();
    let mut by_group: HashMap<Option<&str>, HashMap<String, usize>> = HashMap::new();
    for (u, s) in users.iter().zip(&servers) {
        *by_group
            .entry(*u)
            .or_default()
            .entry(circuit_to(&client, s.addr))
            .or_default() += 1;
    }
    let general = &by_group[&None];
    let alice = &by_group[&Some("alice")];
    assert_eq!(general.len(), 3, "{general:?}");
    assert_eq!(alice.len(), 2, "{alice:?}");
    assert!(general.values().chain(alice.values()).all(|n| *n <= 3));
    let shared: HashSet<_> = general.keys().filter(|c| alice.contains_key(*c)).collect();
    assert!(
        shared.is_empty(),
        "circuits shared across groups: {shared:?}"
    );
    let m = metrics_text(&client);
    assert_metric(&m, "halfpipe_circuits{role=\"client\"}", 5.0);
    assert_metric(
        &m,
        "halfpipe_socks_replies_total{version=\"5\",code=\"0x00\"}",
        11.0,
    );
    for limit in ["circuit", "circuits", "process", "share"] {
        let sample = format!("halfpipe_streams_refused_total{{limit=\"{limit}\"}}");
        assert_metric(&m, &sample, 0.0);
    }
    drop(held);
}

#[test]
fn a_new_username_is_served_while_others_hold_every_circuit_the_exit_allows_a_link() {
    // The attack: one local user with 40 SOCKS usernames holds a stream
    // each, and the exit allows 32 circuits per link, so new usernames were
    // refused. Here the exit allows 4 per link and 12 usernames hold a
    // stream each: the client opens more links (the first carries the
    // general circuit and 3 users), and a 13th username is served at once.
    let exit = Daemon::exit(&[
        "--exit-policy",
        "accept *:*",
        "--max-circuits-per-link",
        "4",
        "--status",
        "127.0.0.1:0",
    ]);
    let client = Daemon::client(exit.link(), &["--status", "127.0.0.1:0"]);
    let server = Server::echo();
    let mut held = Vec::new();
    for i in 0..12 {
        let user = format!("user{i}");
        held.push(
            held_echo(client.socks(), &server, Some(&user))
                .unwrap_or_else(|c| panic!("{user}: SOCKS {c:#04x}")),
        );
    }
    let started = Instant::now();
    let newcomer = held_echo(client.socks(), &server, Some("newcomer"));
    assert!(newcomer.is_ok(), "the new username got {newcomer:?}");
    eprintln!(
        "new username served in {:?} with 12 held",
        started.elapsed()
    );
    let m = metrics_text(&client);
    // 1 general + 13 isolated circuits, 4 to a link.
    assert_metric(&m, "halfpipe_circuits{role=\"client\"}", 14.0);
    assert_metric(&m, "halfpipe_links{role=\"client\"}", 4.0);
    assert_metric(
        &m,
        "halfpipe_streams_refused_total{limit=\"circuits\"}",
        0.0,
    );
    let e = metrics_text(&exit);
    assert!(
        metric_value(
            &e,
            "halfpipe_destroy_total{direction=\"sent\",reason=\"RESOURCELIMIT\"}"
        ) >= 3.0,
        "the exit refused a circuit on each full link: {e}"
    );
    // And the groups stay apart: each stream of a user is alone on its
    // circuit here, and one more stream of user0 shares user0's circuit.
    let again = held_echo(client.socks(), &server, Some("user0"));
    assert!(again.is_ok(), "{again:?}");
    let m = metrics_text(&client);
    assert_metric(&m, "halfpipe_circuits{role=\"client\"}", 14.0);
    drop(held);
}

#[test]
fn past_its_most_links_the_client_refuses_and_counts_it() {
    // The limit that remains: the client opens at most 16 links to its
    // exit. With one circuit allowed per link, the first link carries the
    // general circuit and 15 more carry one username each; the 16th
    // username gets 0x01, counted as limit "circuits", while the streams
    // held are untouched and the general circuit still serves.
    let exit = Daemon::exit(&[
        "--exit-policy",
        "accept *:*",
        "--max-circuits-per-link",
        "1",
    ]);
    let client = Daemon::client(exit.link(), &["--status", "127.0.0.1:0"]);
    let server = Server::echo();
    let mut held = Vec::new();
    for i in 0..15 {
        let user = format!("user{i}");
        held.push(
            held_echo(client.socks(), &server, Some(&user))
                .unwrap_or_else(|c| panic!("{user}: SOCKS {c:#04x}")),
        );
    }
    let refused = held_echo(client.socks(), &server, Some("one-too-many"));
    assert_eq!(refused.err(), Some(0x01));
    let m = metrics_text(&client);
    assert_metric(&m, "halfpipe_links{role=\"client\"}", 16.0);
    assert_metric(
        &m,
        "halfpipe_streams_refused_total{limit=\"circuits\"}",
        1.0,
    );
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("user{i}: {e}"));
    }
    assert!(held_echo(client.socks(), &server, None).is_ok());
}

#[test]
fn forty_usernames_at_once_get_their_circuits_over_few_links() {
    // The attack at its own scale: 40 usernames ask at the same moment,
    // with the exit's default of 32 circuits per link. Every one is served,
    // the client opens another link rather than one per refusal, and a new
    // username is served while the 40 are held.
    let exit = Daemon::exit(&["--exit-policy", "accept *:*"]);
    let client = Daemon::client(exit.link(), &["--status", "127.0.0.1:0"]);
    let server = Server::echo();
    let (proxy, port) = (client.socks(), server.addr.port());
    let askers: Vec<_> = (0..40)
        .map(|i| {
            thread::spawn(move || {
                let user = format!("user{i}");
                socks5(proxy, "127.0.0.1", port, Some((&user, "pw")))
            })
        })
        .collect();
    let answers: Vec<_> = askers.into_iter().map(|t| t.join().unwrap()).collect();
    let refused: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(refused.is_empty(), "refused {refused:?}:\n{}", client.log());
    let held: Vec<TcpStream> = answers.into_iter().flatten().collect();
    let newcomer = held_echo(client.socks(), &server, Some("newcomer"));
    assert!(newcomer.is_ok(), "the new username got {newcomer:?}");
    let m = metrics_text(&client);
    assert_metric(&m, "halfpipe_circuits{role=\"client\"}", 42.0);
    let links = metric_value(&m, "halfpipe_links{role=\"client\"}");
    assert!(
        (2.0..=3.0).contains(&links),
        "{links} links for 42 circuits: {m}"
    );
    drop(held);
}

#[test]
fn past_the_process_circuit_limit_a_new_username_is_refused_and_counted() {
    // The other limit that remains: 512 circuits in a process. In `run`
    // mode each circuit counts twice (client and exit end), so usernames
    // holding a stream each fill the process at about 255 besides the
    // general circuit; the next gets 0x01, counted as limit "circuits",
    // and the streams held go on.
    let d = Daemon::run(&["--status", "127.0.0.1:0"]);
    let server = Server::echo();
    let mut held = Vec::new();
    let refused = loop {
        let user = format!("user{}", held.len());
        match held_echo(d.socks(), &server, Some(&user)) {
            Ok(s) => held.push(s),
            Err(code) => break code,
        }
        assert!(held.len() <= 256, "no limit reached");
    };
    assert_eq!(refused, 0x01);
    assert!(held.len() >= 250, "refused after {} usernames", held.len());
    // The log reaches us through a pipe, maybe after the reply.
    d.wait_for_log("SOCKS request failed");
    let why = d
        .log()
        .lines()
        .find(|l| l.contains("SOCKS request failed"))
        .map(str::to_owned);
    assert!(
        why.as_deref()
            .is_some_and(|l| l.contains("this process holds 512 circuits")),
        "{why:?}"
    );
    let m = metrics_text(&d);
    assert_metric(
        &m,
        "halfpipe_streams_refused_total{limit=\"circuits\"}",
        1.0,
    );
    for s in held.iter_mut() {
        s.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
    }
}

#[test]
fn a_burst_of_one_groups_requests_fills_new_circuits_one_after_another() {
    // 60 requests of one group at the same moment, 2 streams to a
    // circuit: each is served. One request at a time creates the group's
    // next circuit and the others wait for it, so about 30 circuits carry
    // the 60 streams (not one each), for the group without credentials
    // and for a username alike.
    let exit = Daemon::exit(&["--exit-policy", "accept *:*"]);
    let client = Daemon::client(
        exit.link(),
        &["--max-streams-per-circuit", "2", "--status", "127.0.0.1:0"],
    );
    let server = Server::echo();
    let (proxy, port) = (client.socks(), server.addr.port());
    for user in [None, Some("alice")] {
        let askers: Vec<_> = (0..60)
            .map(|_| {
                thread::spawn(move || socks5(proxy, "127.0.0.1", port, user.map(|u| (u, "pw"))))
            })
            .collect();
        let answers: Vec<_> = askers.into_iter().map(|t| t.join().unwrap()).collect();
        let refused: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
        assert!(
            refused.is_empty(),
            "{user:?}: refused {refused:?}:\n{}",
            client.log()
        );
        let m = metrics_text(&client);
        let circuits = metric_value(&m, "halfpipe_circuits{role=\"client\"}");
        eprintln!("{user:?}: 60 streams at once on {circuits} client circuits in all");
        drop(answers);
    }
    let m = metrics_text(&client);
    let circuits = metric_value(&m, "halfpipe_circuits{role=\"client\"}");
    // 30 for each group, and circuits of the first group may not have
    // ended yet; creating one per request would be 120.
    assert!(circuits <= 64.0, "{circuits} circuits for 120 streams: {m}");
}

#[test]
fn a_burst_of_usernames_fills_links_to_the_exits_limit() {
    // 20 usernames at the same moment, the exit allowing 4 circuits per
    // link: each is served, and the links are used up to the exit's limit
    // rather than left part empty after a refusal (21 circuits: 6 links
    // at best; a refusal while other circuits were in their handshake
    // may cost one more).
    let exit = Daemon::exit(&[
        "--exit-policy",
        "accept *:*",
        "--max-circuits-per-link",
        "4",
    ]);
    let client = Daemon::client(exit.link(), &["--status", "127.0.0.1:0"]);
    let server = Server::echo();
    let (proxy, port) = (client.socks(), server.addr.port());
    let askers: Vec<_> = (0..20)
        .map(|i| {
            thread::spawn(move || {
                let user = format!("user{i}");
                socks5(proxy, "127.0.0.1", port, Some((&user, "pw")))
            })
        })
        .collect();
    let answers: Vec<_> = askers.into_iter().map(|t| t.join().unwrap()).collect();
    let refused: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(refused.is_empty(), "refused {refused:?}:\n{}", client.log());
    let m = metrics_text(&client);
    let links = metric_value(&m, "halfpipe_links{role=\"client\"}");
    eprintln!("20 usernames at once over {links} links");
    assert!(
        links <= 8.0,
        "{links} links for 21 circuits, 4 to a link: {m}"
    );
}
