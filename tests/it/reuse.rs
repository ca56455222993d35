//! Thread reuse (docs/design.md, "Thread reuse"): a stream's threads come
//! from parked ones when there are, renamed for the stream, and parked
//! threads retire once idle.

use crate::util::*;
use std::io::{Read, Write};
use std::net::Shutdown;

fn parked(d: &Daemon) -> usize {
    d.thread_names().iter().filter(|n| *n == "parked").count()
}

/// One echo exchange through `d`'s SOCKS port, then both ends closed.
fn one_stream(d: &Daemon, server: &Server, check: impl FnOnce()) {
    let mut s = socks5(d.socks(), "127.0.0.1", server.addr.port(), None).expect("SOCKS");
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    check();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(s.read(&mut b).unwrap(), 0);
}

#[test]
fn stream_threads_are_reused_renamed_and_retire_when_idle() {
    let server = Server::echo();
    let d = Daemon::run(&["--status", "127.0.0.1:0"]);
    let baseline = d.thread_count();
    one_stream(&d, &server, || {});
    // Its five tasks (socks, two at each edge) end and their threads park:
    // every thread started so far (four if the SOCKS thread was free again
    // in time for the stream's packager).
    d.wait_for_threads(baseline);
    let started = eventually("threads park", || {
        let started = metric_value(&metrics_text(&d), "halfpipe_thread_starts_total");
        (started >= 4.0 && parked(&d) == started as usize).then_some(started)
    });
    one_stream(&d, &server, || {
        // The second stream's threads carry its names (top -H, ps -L).
        let names = d.working_threads();
        for prefix in ["pk ", "dl "] {
            assert_eq!(
                names.iter().filter(|n| n.starts_with(prefix)).count(),
                2,
                "{names:?}"
            );
        }
    });
    // At most one new thread (when the second stream's tasks overlap
    // differently from the first's); the rest are reused.
    let text = metrics_text(&d);
    assert!(
        metric_value(&text, "halfpipe_thread_reuses_total") >= 4.0,
        "{text}"
    );
    assert!(
        metric_value(&text, "halfpipe_thread_starts_total") <= started + 1.0,
        "the second stream started its own threads: {text}"
    );
    d.wait_for_threads(baseline);
    // Parked threads retire after 10 s without a task.
    eventually("parked threads retire", || (parked(&d) == 0).then_some(()));
    assert_eq!(d.thread_count(), baseline);
}
