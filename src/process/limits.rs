//! How many streams this process can hold before the kernel says no.
//!
//! A stream costs two threads and one descriptor in each process it passes
//! through. On Linux every thread also costs 4 memory mappings (stack, guard
//! page, signal stack and its guard), and a process that reaches
//! `vm.max_map_count` aborts inside std (SIGABRT, not an error) when it
//! spawns the next thread. So halfpipe caps streams below what the kernel
//! allows and never relies on catching a failed spawn.

use std::fs;

/// Mappings per thread (measured on these machines; see the module doc).
const MAPS_PER_THREAD: u64 = 4;
/// Mappings kept for the process itself: binary, libraries, heap arenas.
const MAPS_RESERVED: u64 = 2048;
/// Circuits in the whole process (each is a thread); past it the exit
/// answers DESTROY(RESOURCELIMIT).
pub const MAX_CIRCUITS: usize = 512;
/// Links an exit holds at once (each is two threads).
pub const MAX_LINKS: usize = 128;
/// Links a client keeps to its exit: the first, and more while the exit
/// refuses circuits on those it has (its per-link circuit limit).
pub const MAX_EXIT_LINKS: usize = 16;
/// SOCKS handshakes in progress at once (each is a thread).
pub const MAX_HANDSHAKES: usize = 256;
/// Status endpoint connections served at once (each is a thread).
pub const MAX_STATUS_CONNECTIONS: usize = 8;
/// Name lookups in flight at once (each is a thread: getaddrinfo blocks).
pub const MAX_LOOKUPS: usize = 64;
/// Stream and SOCKS threads kept parked for the next stream to take
/// (`runtime::pool`), and how long one waits before it retires.
pub const MAX_PARKED: usize = 256;
pub const PARKED_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// Threads kept for all of the above, plus the client's links to its exit
/// (2 × `MAX_EXIT_LINKS`), acceptors and the like (64 in all).
const THREADS_RESERVED: u64 = (MAX_CIRCUITS
    + 2 * MAX_LINKS
    + MAX_HANDSHAKES
    + MAX_STATUS_CONNECTIONS
    + MAX_LOOKUPS
    + MAX_PARKED
    + 64) as u64;
/// Descriptors kept for listeners, links and the process itself.
const FDS_RESERVED: u64 = 256;
/// Threads per stream in one process: packager and deliverer.
const THREADS_PER_STREAM: u64 = 2;

/// What the kernel allows and what follows from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    pub streams: usize,
    /// The setting that limits `streams`, and its value.
    pub limited_by: &'static str,
    pub limit_value: u64,
}

/// Raw limits, read from /proc and getrlimit.
#[derive(Debug, Clone, Copy)]
pub struct KernelLimits {
    pub max_map_count: u64,
    pub pid_max: u64,
    pub threads_max: u64,
    pub nofile: u64,
}

impl KernelLimits {
    /// Reads the limits, first raising the soft descriptor limit to the
    /// hard one (as most daemons do).
    pub fn read() -> KernelLimits {
        KernelLimits {
            max_map_count: read_proc("/proc/sys/vm/max_map_count").unwrap_or(65530),
            pid_max: read_proc("/proc/sys/kernel/pid_max").unwrap_or(32768),
            threads_max: read_proc("/proc/sys/kernel/threads-max").unwrap_or(u64::MAX),
            nofile: raise_nofile(),
        }
    }

    /// Streams this process can hold.
    pub fn capacity(&self) -> Capacity {
        let by_maps = (self.max_map_count.saturating_sub(MAPS_RESERVED) / MAPS_PER_THREAD)
            .saturating_sub(THREADS_RESERVED)
            / THREADS_PER_STREAM;
        // pid_max and threads-max are system-wide: keep a quarter for the
        // rest of the system (and a second halfpipe process).
        let by_pids = (self.pid_max * 3 / 4).saturating_sub(THREADS_RESERVED) / THREADS_PER_STREAM;
        let by_threads =
            (self.threads_max / 2).saturating_sub(THREADS_RESERVED) / THREADS_PER_STREAM;
        let by_fds = self.nofile.saturating_sub(FDS_RESERVED);
        let options = [
            (by_maps, "vm.max_map_count", self.max_map_count),
            (by_pids, "kernel.pid_max", self.pid_max),
            (by_threads, "kernel.threads-max", self.threads_max),
            (by_fds, "RLIMIT_NOFILE (ulimit -n)", self.nofile),
        ];
        let (streams, limited_by, limit_value) = options
            .into_iter()
            .min_by_key(|o| o.0)
            .expect("four options");
        Capacity {
            streams: streams as usize,
            limited_by,
            limit_value,
        }
    }
}

fn read_proc(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_kernel_is_limited_by_mappings() {
        // The machines here: max_map_count 65530, pid_max 32768, ulimit 20000.
        let k = KernelLimits {
            max_map_count: 65530,
            pid_max: 32768,
            threads_max: 192729,
            nofile: 20000,
        };
        let c = k.capacity();
        assert_eq!(c.limited_by, "vm.max_map_count");
        // (65530 - 2048) / 4 = 15870 threads, minus 1416 reserved (256 of
        // them parked), / 2.
        assert_eq!(c.streams, 7227);
        // 2 threads each stay below the abort point near 16,000 threads.
        assert!((c.streams as u64) * 2 + THREADS_RESERVED < 16_000);
    }

    #[test]
    fn raised_limits_move_the_bottleneck() {
        let k = KernelLimits {
            max_map_count: 1_000_000,
            pid_max: 4_194_304,
            threads_max: 192729,
            nofile: 20000,
        };
        assert_eq!(k.capacity().limited_by, "RLIMIT_NOFILE (ulimit -n)");
        let k = KernelLimits {
            nofile: 1_000_000,
            ..k
        };
        assert_eq!(k.capacity().limited_by, "kernel.threads-max");
    }
}
