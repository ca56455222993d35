//! The status endpoint's HTTP server: blocking, a thread per connection as
//! everything else in halfpipe, and bounded in every way a client could
//! stretch it, so that no client of the status port can take the daemon
//! down or keep it from serving streams:
//!
//! - at most `MAX_STATUS_CONNECTIONS` connections at once (their threads
//!   are part of the process's reserved threads, `process::limits`); past
//!   that a new connection is closed at once;
//! - a whole request (request line and headers) must arrive within
//!   `REQUEST_DEADLINE` and fit in `MAX_REQUEST` bytes, else it is answered
//!   408 or 431 and closed;
//! - an answer that the client does not read within `REQUEST_DEADLINE` is
//!   given up;
//! - a failing accept() (EMFILE and the like) is waited out, never fatal.
//!
//! Only `GET` is served, one request per connection (`Connection: close`).

use crate::process::limits::MAX_STATUS_CONNECTIONS;
use crate::runtime::ratelimit;
use crate::runtime::threads::{self, Reaper};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a client has to send its whole request, and to take the answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// The largest request (request line and headers) read.
pub const MAX_REQUEST: usize = 8 * 1024;

/// An answer.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_owned(),
        }
    }
}

/// What the server answers a `GET` of a path with.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// A running server: its acceptor thread owns the connection threads.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

/// What the acceptor and the connections share with `stop`.
struct Shared {
    stopping: AtomicBool,
    /// The connections being served, so that `stop` can end them at once.
    open: Mutex<HashMap<u64, TcpStream>>,
    next: AtomicU64,
}

impl Server {
    /// Starts `status-http` on `listener`.
    pub fn start(listener: TcpListener, handler: Handler) -> io::Result<Server> {
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            open: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        });
        let acceptor = {
            let (listener, shared) = (listener.try_clone()?, shared.clone());
            threads::spawn("status-http".into(), move || {
                accept_loop(&listener, &shared, &handler)
            })?
        };
        Ok(Server {
            listener,
            shared,
            acceptor,
        })
    }

    /// Stops accepting, ends the connections being served and joins every
    /// thread.
    pub fn stop(self) {
        self.shared.stopping.store(true, Ordering::Release);
        // shutdown() on a listening socket wakes the thread in accept().
        let _ = socket2::SockRef::from(&self.listener).shutdown(Shutdown::Read);
        for s in self.shared.open.lock().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        threads::join(self.acceptor);
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, handler: &Handler) {
    let mut conns = Reaper::default();
    for conn in listener.incoming() {
        conns.reap();
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        let sock = match conn {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: wait for descriptors to come back.
                if ratelimit::refusal_line() {
                    tracing::warn!("status endpoint: accept failed: {e}; retrying");
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if conns.len() >= MAX_STATUS_CONNECTIONS {
            // Closed at once: a status client waits its turn by retrying.
            continue;
        }
        let id = shared.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = sock.try_clone() {
            shared.open.lock().insert(id, clone);
        }
        let (shared2, handler) = (shared.clone(), handler.clone());
        let spawned = threads::spawn("status-http".into(), move || {
            serve(sock, &handler);
            shared2.open.lock().remove(&id);
        });
        match spawned {
            Ok(h) => conns.push(h),
            Err(_) => {
                shared.open.lock().remove(&id);
            }
        }
    }
    conns.join_all();
}

/// One connection: read the request within its deadline and size, answer.
fn serve(mut sock: TcpStream, handler: &Handler) {
    let response = match read_request(&mut sock) {
        Ok((method, path)) if method == "GET" => handler(&path),
        Ok(_) => Response::text(405, "only GET is served\n"),
        Err(RequestError::TooLarge) => Response::text(431, "request too large\n"),
        Err(RequestError::Timeout) => Response::text(408, "request not complete in time\n"),
        Err(RequestError::Malformed) => Response::text(400, "not an HTTP request\n"),
        Err(RequestError::Gone) => return,
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    let _ = sock.set_write_timeout(Some(REQUEST_DEADLINE));
    let written = sock
        .write_all(head.as_bytes())
        .and_then(|()| sock.write_all(response.body.as_bytes()));
    if let Err(e) = written {
        tracing::debug!("status client went away: {e}");
    }
    let _ = sock.shutdown(Shutdown::Write);
}

#[derive(Debug, PartialEq, Eq)]
enum RequestError {
    TooLarge,
    Timeout,
    Malformed,
    /// The client closed or reset before its request was complete.
    Gone,
}

/// Reads a request's head (up to the empty line) within `REQUEST_DEADLINE`
/// and `MAX_REQUEST` bytes: its method and its path (without a query).
fn read_request(sock: &mut TcpStream) -> Result<(String, String), RequestError> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            return parse_request_line(&buf[..end]);
        }
        if buf.len() >= MAX_REQUEST {
            return Err(RequestError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RequestError::Timeout);
        }
        sock.set_read_timeout(Some(left))
            .map_err(|_| RequestError::Gone)?;
        let want = chunk.len().min(MAX_REQUEST - buf.len());
        match sock.read(&mut chunk[..want]) {
            Ok(0) => return Err(RequestError::Gone),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(RequestError::Timeout)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(RequestError::Gone),
        }
    }
}

/// Where the head ends (the first empty line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n"))
}

/// `METHOD SP TARGET SP HTTP/x.y`: the method and the target's path.
fn parse_request_line(head: &[u8]) -> Result<(String, String), RequestError> {
    let text = std::str::from_utf8(head).map_err(|_| RequestError::Malformed)?;
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(RequestError::Malformed);
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok((method.to_owned(), path.to_owned()))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_to_method_and_path() {
        let ok = |s: &str| parse_request_line(s.as_bytes());
        assert_eq!(
            ok("GET /streams?x=1 HTTP/1.1\r\nHost: a\r\n"),
            Ok(("GET".into(), "/streams".into()))
        );
        assert_eq!(
            ok("POST /metrics HTTP/1.0"),
            Ok(("POST".into(), "/metrics".into()))
        );
        for bad in [
            "GET /streams",
            "GET streams HTTP/1.1",
            "GET / HTTP/2",
            "GET  / HTTP/1.1",
            "",
        ] {
            assert_eq!(ok(bad), Err(RequestError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn the_head_ends_at_the_first_empty_line() {
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nrest"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\nHost: x\r\n"), None);
    }
}
