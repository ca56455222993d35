//! Socket operations std does not offer: the reset of docs/protocol.md §8
//! and the thread ids shown in the status table.

use socket2::SockRef;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

/// Resets a TCP connection now, from any thread (R8.7, R8.8: reset at once,
/// so that the peer sees a reset and not an end of file; the "Reset" of
/// docs/protocol.md, "Conventions": SO_LINGER with a zero timeout).
///
/// `connect(AF_UNSPEC)` makes Linux send RST, drop both queues and wake
/// every thread blocked on the socket (read, write or connect) with an
/// error: a plain close() would do neither while another thread is inside
/// a call on the same descriptor. SO_LINGER 0 covers the close that follows.
pub fn reset<S: AsFd>(sock: &S) {
    let sref = SockRef::from(sock);
    let _ = sref.set_linger(Some(Duration::ZERO));
    let addr = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: a plain connect(2) on a valid fd with a properly sized address.
    // Its result does not matter: on a socket that is not connected it is a
    // no-op, and the SO_LINGER 0 above still turns the final close into RST.
    unsafe {
        libc::connect(
            sref.as_raw_fd(),
            &addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        );
    }
}

/// The calling thread's kernel thread id (what `top -H` and gdb show).
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The END reason for an I/O error on a stream's socket (the table of §8).
pub fn end_reason_for(err: &io::Error) -> u8 {
    use halfpipe_proto::relay::end_reason;
    match err.kind() {
        // R8.2: the TCP connection was reset. ECONNABORTED is not here:
        // the host aborted the connection (`ss -K`), not its peer.
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => end_reason::CONNRESET,
        // R8.3: a timeout.
        io::ErrorKind::TimedOut => end_reason::TIMEOUT,
        // R8.4: a local resource failure (no buffer space, no memory).
        _ if matches!(err.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM)) => {
            end_reason::RESOURCELIMIT
        }
        // R8.6: any other error.
        _ => end_reason::MISC,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn reset_makes_the_peer_see_econnreset_and_wakes_a_blocked_reader() {
        // R8.7, R8.8: the reset an abort does: the peer sees a reset, not
        // an EOF.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut app = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        let ours = std::sync::Arc::new(ours);
        let reader = {
            let ours = ours.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                (&*ours).read(&mut buf)
            })
        };
        app.write_all(b"").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        reset(&*ours);
        let woke = reader.join().unwrap();
        assert!(
            matches!(woke, Ok(0) | Err(_)),
            "blocked reader woke: {woke:?}"
        );
        let mut buf = [0u8; 16];
        let err = app.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn io_errors_map_to_the_end_reasons_of_section_8() {
        // R8.2: a reset (or a write to a connection the peer reset) is
        // CONNRESET; R8.3: a timeout is TIMEOUT; R8.4: no buffer space or
        // memory is RESOURCELIMIT; R8.6: any other error is MISC.
        use halfpipe_proto::relay::end_reason;
        let reason = |kind| end_reason_for(&io::Error::from(kind));
        for kind in [io::ErrorKind::ConnectionReset, io::ErrorKind::BrokenPipe] {
            assert_eq!(reason(kind), end_reason::CONNRESET, "{kind:?}");
        }
        assert_eq!(reason(io::ErrorKind::TimedOut), end_reason::TIMEOUT);
        for kind in [
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::Other,
            io::ErrorKind::InvalidData,
        ] {
            assert_eq!(reason(kind), end_reason::MISC, "{kind:?}");
        }
        let eio = io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(end_reason_for(&eio), end_reason::MISC);
        for code in [libc::ENOBUFS, libc::ENOMEM] {
            let e = io::Error::from_raw_os_error(code);
            assert_eq!(end_reason_for(&e), end_reason::RESOURCELIMIT, "{e}");
        }
    }
}
