//! Failures the kit brings about on its own host, for the rows of §5 and
//! §8 that no peer can cause through a socket: a process that can start
//! no more threads (a pids cgroup), and a TCP connection aborted by the
//! host (`ss -K`, the kernel's SOCK_DESTROY). Both need root; a case that
//! cannot have them is skipped with the reason, never passed.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A pids cgroup holding one process, so that a case can stop it from
/// starting tasks (threads count as tasks). On drop the process goes back
/// to the cgroup it came from and the new one is removed.
///
/// The process is the one the kit started: a wrapper script must `exec`
/// the implementation, or the cap holds the wrapper and not it (the case
/// then sees no failure, and skips).
pub struct ThreadCap {
    dir: PathBuf,
    home: PathBuf,
    pid: u32,
}

impl ThreadCap {
    /// Moves `pid` (all its threads) into a new pids cgroup, uncapped.
    pub fn new(pid: u32) -> Result<ThreadCap, String> {
        let (base, v1) = pids_hierarchy().ok_or(
            "no pids cgroup to make (needs root and the pids controller: cgroup v1, or v2 with it enabled)",
        )?;
        let home = base.join(own_cgroup(pid, v1)?.trim_start_matches('/'));
        let dir = home.join(format!("halfpipe-conform-{pid}"));
        fs::create_dir(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        if !dir.join("pids.max").exists() {
            let _ = fs::remove_dir(&dir);
            return Err(format!(
                "the pids controller is not enabled in {}",
                home.display()
            ));
        }
        let cap = ThreadCap { dir, home, pid };
        cap.write("cgroup.procs", &pid.to_string())?;
        Ok(cap)
    }

    /// How many tasks the process has now.
    pub fn current(&self) -> Result<u64, String> {
        let text = fs::read_to_string(self.dir.join("pids.current"))
            .map_err(|e| format!("pids.current: {e}"))?;
        text.trim()
            .parse()
            .map_err(|e| format!("pids.current {text:?}: {e}"))
    }

    /// Lets the process have `spare` tasks more than it has now, and no
    /// more: past them, starting a thread fails (EAGAIN).
    pub fn allow_more(&self, spare: u64) -> Result<(), String> {
        let now = self.current()?;
        self.write("pids.max", &(now + spare).to_string())
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        fs::write(self.dir.join(file), value)
            .map_err(|e| format!("cannot write {value} to {file}: {e}"))
    }
}

impl Drop for ThreadCap {
    fn drop(&mut self) {
        let _ = self.write("pids.max", "max");
        let _ = fs::write(self.home.join("cgroup.procs"), self.pid.to_string());
        let _ = fs::remove_dir(&self.dir);
    }
}

/// The root of a hierarchy with the pids controller, if this host has one
/// the kit may use, and whether it is cgroup v1's own. v2 is used only
/// where the controller is already enabled below the root: the kit does
/// not change the host's cgroup set-up.
fn pids_hierarchy() -> Option<(PathBuf, bool)> {
    let v1 = Path::new("/sys/fs/cgroup/pids");
    if v1.join("cgroup.procs").exists() {
        return Some((v1.to_path_buf(), true));
    }
    let v2 = Path::new("/sys/fs/cgroup");
    fs::read_to_string(v2.join("cgroup.subtree_control"))
        .ok()
        .filter(|s| s.split_whitespace().any(|c| c == "pids"))
        .map(|_| (v2.to_path_buf(), false))
}

/// The cgroup `pid` is in, in the pids hierarchy (v1) or the unified one
/// (v2), as /proc/PID/cgroup names it.
fn own_cgroup(pid: u32, v1: bool) -> Result<String, String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| format!("/proc/{pid}/cgroup: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let ours = if v1 {
                controllers.split(',').any(|c| c == "pids")
            } else {
                controllers.is_empty()
            };
            ours.then(|| path.to_string())
        })
        .next()
        .ok_or_else(|| format!("no pids cgroup for {pid} in /proc/{pid}/cgroup"))
}

/// Aborts the TCP connection from `local` to `peer` on this host, as an
/// administrator would (`ss -K`): the owner's next read fails with
/// ECONNABORTED and the peer is sent a reset. The caller checks that it
/// took (the peer's reset): `ss` says little when it cannot.
pub fn abort_connection(local: SocketAddr, peer: SocketAddr) -> Result<(), String> {
    let out = Command::new("ss")
        .args(["-K", "-t", "src"])
        .arg(local.to_string())
        .arg("dst")
        .arg(peer.to_string())
        .output()
        .map_err(|e| format!("cannot run `ss -K` (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ss -K` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
