//! What the hold scenario reads from /proc: RSS, PSS, threads and processes
//! of the daemons under test, and a description of the machine.
//!
//! A given PID counts together with all its descendants, so forking
//! servers (sshd's per-connection processes, socat's `fork`) are measured
//! whole; for halfpipe, which never forks, that is the process itself.

use super::report::{Machine, Usage};
use std::collections::HashMap;
use std::fs;

/// The number after `key` in a /proc status-style text (0 if absent).
pub(super) fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One process: VmRSS from status, Pss from smaps_rollup, threads at work
/// from /proc/PID/task. None once it is gone.
fn process(pid: u32) -> Option<Usage> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let threads = working_threads(pid)?;
    let pss_kib = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map(|s| status_kib(&s, "Pss:"))
        .unwrap_or(0);
    Some(Usage {
        rss_kib: status_kib(&status, "VmRSS:"),
        pss_kib,
        threads,
        processes: 1,
    })
}

/// Threads of `pid` other than parked ones: halfpipe keeps up to 256
/// threads between streams, named "parked", which retire after 10 s idle
/// (its docs/design.md, "Thread reuse"); they hold no stream. (Their
/// memory is in the RSS figures all the same.)
pub fn working_threads(pid: u32) -> Option<u64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .flatten()
            .filter(|t| {
                fs::read_to_string(t.path().join("comm")).map_or(true, |c| c.trim() != "parked")
            })
            .count() as u64,
    )
}

/// The parent of every process, from /proc/*/stat.
fn parents() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return map;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            map.insert(pid, ppid);
        }
    }
    map
}

/// `root` and its descendants.
fn tree(root: u32, parents: &HashMap<u32, u32>) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|&(_, &pp)| pp == p).map(|(&c, _)| c));
        i += 1;
    }
    out
}

pub fn add(a: &Usage, b: &Usage) -> Usage {
    Usage {
        rss_kib: a.rss_kib + b.rss_kib,
        pss_kib: a.pss_kib + b.pss_kib,
        threads: a.threads + b.threads,
        processes: a.processes + b.processes,
    }
}

/// Usage of each PID's process tree, in the order given.
pub fn sample(pids: &[u32]) -> Vec<Usage> {
    if pids.is_empty() {
        return Vec::new();
    }
    let parents = parents();
    pids.iter()
        .map(|&root| {
            tree(root, &parents)
                .into_iter()
                .filter_map(process)
                .fold(Usage::default(), |acc, u| add(&acc, &u))
        })
        .collect()
}

/// CPU time (user + system, in µs) of each PID's process tree, summed,
/// with the children it has reaped; None without PIDs or once one is gone.
pub fn cpu_us(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let parents = parents();
    let mut ticks = 0u64;
    for &root in pids {
        fs::metadata(format!("/proc/{root}")).ok()?;
        for pid in tree(root, &parents) {
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue; // ended meanwhile: its parent counts it once reaped
            };
            // Fields after "(comm)": state is the 1st, utime the 12th,
            // stime, cutime and cstime the next three (proc(5)).
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            ticks += after
                .split_whitespace()
                .skip(11)
                .take(4)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Some(ticks as f64 * 1e6 / hz)
}

/// CPU time (user + system, in µs) this process has used so far.
pub fn self_cpu_us() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(u.ru_utime) + us(u.ru_stime)
}

/// A process's name (its comm).
pub fn name(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Host name, CPU model, cores and kernel, for the report and the chart.
pub fn machine() -> Machine {
    let read = |p: &str| fs::read_to_string(p).map(|s| s.trim().to_string()).ok();
    let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    Machine {
        hostname: read("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".into()),
        cpu,
        cores,
        kernel: read("/proc/sys/kernel/osrelease").unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let s = "Name:\tx\nVmRSS:\t  1234 kB\nThreads:\t3\n";
        assert_eq!(status_kib(s, "VmRSS:"), 1234);
        assert_eq!(status_kib(s, "VmHWM:"), 0);
    }

    #[test]
    fn trees_follow_parents() {
        let parents: HashMap<u32, u32> = [(2, 1), (3, 2), (4, 1), (5, 9)].into();
        let mut t = tree(1, &parents);
        t.sort();
        assert_eq!(t, vec![1, 2, 3, 4]);
    }

    #[test]
    fn this_process_is_sampled() {
        let u = sample(&[std::process::id()]);
        assert_eq!(u.len(), 1);
        assert!(u[0].rss_kib > 0 && u[0].threads >= 1 && u[0].processes >= 1);
    }
}
