#!/usr/bin/env python3
"""scripts/attacks.py: the attacks of docs/robustness.md ("One user
against the others") at the scale they were first measured, against the
release build, with the figures printed beside what a legitimate user
gets meanwhile.

    cargo build --release && scripts/attacks.py [--only NAME ...]

Each attack starts fresh daemons on 127.0.0.1 ephemeral ports and stops
them when it ends. The integration tests (tests/it/) check the same
defences at a scale the suite can afford; this script is for the figures
(docs/robustness.md quotes them). It needs only python3.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXE = os.path.join(ROOT, "target", "release", "halfpipe")


class Daemon:
    """A halfpipe process; the addresses it prints on stdout."""

    def __init__(self, *args):
        self.p = subprocess.Popen(
            [EXE, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.addrs = {}
        self.fingerprint = None
        want = {"SOCKS listening on ": "socks", "link listening on ": "link",
                "status listening on ": "status"}
        need = {v for k, v in want.items()
                if (v == "socks" and args[0] in ("run", "client"))
                or (v == "link" and args[0] == "exit")
                or (v == "status" and "--status" in args)}
        while not need <= set(self.addrs):
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"halfpipe {args} exited early")
            if line.startswith("fingerprint: "):
                # A TLS exit's identity, for its clients to pin.
                self.fingerprint = line.split()[1]
            for prefix, key in want.items():
                if prefix in line:
                    host, port = line.split(prefix)[1].split()[0].rsplit(":", 1)
                    self.addrs[key] = (host, int(port))
        if args[0] in ("run", "client"):
            time.sleep(0.3)  # the link to the exit comes up

    def rss_kib(self):
        with open(f"/proc/{self.p.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

    def threads(self):
        return len(os.listdir(f"/proc/{self.p.pid}/task"))

    def fds(self):
        return len(os.listdir(f"/proc/{self.p.pid}/fd"))

    def metrics(self):
        s = socket.create_connection(self.addrs["status"], timeout=10)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        out = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
        return out.decode()

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def socks5(proxy, port, user=None, timeout=30):
    """SOCKS5 CONNECT to 127.0.0.1:port; (socket, reply code)."""
    s = socket.create_connection(proxy, timeout=timeout)
    if user is None:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
    else:
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        u = user.encode()
        s.sendall(bytes([1, len(u)]) + u + b"\x02pw")
        assert s.recv(2) == b"\x01\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big"))
    head = recv_exact(s, 4)
    recv_exact(s, {1: 4, 4: 16}.get(head[3], 0) + 2)
    return s, head[1]


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise ConnectionError("closed")
        b += c
    return b


class Holder:
    """A target that accepts and holds every connection, reading nothing."""

    def __init__(self):
        self.l = socket.socket()
        self.l.bind(("127.0.0.1", 0))
        self.l.listen(4096)
        self.port = self.l.getsockname()[1]
        self.held = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                c, _ = self.l.accept()
            except OSError:
                return
            self.held.append(c)


def timed_user(proxy, port, user=None):
    """How long a legitimate SOCKS user waits for its reply; its code."""
    t = time.monotonic()
    try:
        s, code = socks5(proxy, port, user, timeout=60)
        s.close()
    except (OSError, AssertionError) as e:
        return time.monotonic() - t, f"failed ({e})"
    return time.monotonic() - t, f"0x{code:02x}"


def row(attack, figures):
    print(f"| {attack} | {figures} |", flush=True)


# ---------------------------------------------------------------- attacks

def status_header():
    d = Daemon("run", "--socks", "127.0.0.1:0", "--status", "127.0.0.1:0")
    try:
        before = d.rss_kib()
        sent, answers = [0, 0], []

        def flood(i):
            s = socket.create_connection(d.addrs["status"])
            s.sendall(b"GET /metrics HTTP/1.0\r\nX-Long: ")
            chunk = b"a" * (1 << 20)
            try:
                for _ in range(1024):  # 1 GiB
                    s.sendall(chunk)
                    sent[i] += len(chunk)
            except OSError:
                pass
            try:
                answers.append(s.recv(64).split(b"\r\n")[0].decode())
            except OSError as e:
                answers.append(str(e))

        ts = [threading.Thread(target=flood, args=(i,)) for i in range(2)]
        t0 = time.monotonic()
        [t.start() for t in ts]
        [t.join() for t in ts]
        row("1a. two 1 GiB header lines to `--status`",
            f"each closed after {max(sent) >> 20} MiB sent in {time.monotonic() - t0:.1f} s "
            f"({', '.join(set(answers)) or 'no answer'}); RSS {before} -> {d.rss_kib()} KiB")
    finally:
        d.stop()


def status_idle():
    holder = Holder()
    d = Daemon("run", "--socks", "127.0.0.1:0", "--status", "127.0.0.1:0")
    try:
        base = d.threads()
        conns = []
        for _ in range(5001):
            conns.append(socket.create_connection(d.addrs["status"]))
        time.sleep(1)
        peak = d.threads()
        streams = [socks5(d.addrs["socks"], holder.port)[0] for _ in range(1000)]
        ok = d.metrics().startswith("HTTP/1.1 200")
        row("1b. 5,001 idle connections to `--status`, then 1,000 SOCKS streams",
            f"threads {base} -> {peak} with the 5,001 connected (at most 8 served); "
            f"1,000 streams served; /metrics {'answers' if ok else 'does not answer'}; "
            f"{d.threads()} threads")
        for c in conns + streams:
            c.close()
    finally:
        d.stop()


def socks_slowloris():
    holder = Holder()
    d = Daemon("run", "--socks", "127.0.0.1:0")
    try:
        stop = threading.Event()
        greeting = b"\x05\x01\x02\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255

        def dribble():
            # Cut off (by the handshake deadline, or to make room), the
            # attacker connects again, for as long as the attack lasts.
            while not stop.is_set():
                try:
                    s = socket.create_connection(d.addrs["socks"])
                    for b in greeting:
                        if stop.wait(5):
                            break
                        s.sendall(bytes([b]))
                except OSError:
                    pass

        ts = [threading.Thread(target=dribble, daemon=True) for _ in range(300)]
        [t.start() for t in ts]
        time.sleep(2)
        waits = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            w, code = timed_user(d.addrs["socks"], holder.port)
            waits.append(w)
            time.sleep(2)
        stop.set()
        row("2. 300 SOCKS handshakes dribbled a byte per 5 s, reconnecting when cut off, for 60 s",
            f"a legitimate user, every 2 s: {len(waits)} requests, last {code}, "
            f"slowest {max(waits) * 1000:.1f} ms; {d.threads()} threads")
    finally:
        d.stop()


def usernames():
    holder = Holder()
    exit_ = Daemon("exit", "--listen", "127.0.0.1:0", "--exit-policy", "accept *:*")
    c = Daemon("client", "--socks", "127.0.0.1:0", "--exit", "%s:%d" % exit_.addrs["link"],
               "--exit-fingerprint", exit_.fingerprint,
               "--status", "127.0.0.1:0")
    try:
        t0 = time.monotonic()
        held = [socks5(c.addrs["socks"], holder.port, f"user{i}")[0] for i in range(40)]
        took = time.monotonic() - t0
        w, code = timed_user(c.addrs["socks"], holder.port, "newcomer")
        links = re.search(r'halfpipe_links\{role="client"\} (\d+)', c.metrics()).group(1)
        row("3. 40 SOCKS usernames each holding a stream (exit: 32 circuits per link)",
            f"all 40 served in {took:.2f} s over {links} links; a new username: {code} "
            f"in {w * 1000:.1f} ms")
        for s in held:
            s.close()
    finally:
        c.stop()
        exit_.stop()


def full_circuit():
    holder = Holder()
    d = Daemon("run", "--socks", "127.0.0.1:0", "--status", "127.0.0.1:0")
    try:
        t0 = time.monotonic()
        held = [socks5(d.addrs["socks"], holder.port)[0] for _ in range(1000)]
        took = time.monotonic() - t0
        w, code = timed_user(d.addrs["socks"], holder.port)
        m = d.metrics()
        circuits = re.search(r'halfpipe_circuits\{role="client"\} (\d+)', m).group(1)
        row("4. 1,000 held streams without credentials (limit 1,000 per circuit)",
            f"held in {took:.2f} s; the next user: {code} in {w * 1000:.1f} ms, "
            f"on a second circuit ({circuits} client circuits)")
        for s in held:
            s.close()
    finally:
        d.stop()


def pinned():
    holder = Holder()
    d = Daemon("run", "--socks", "127.0.0.1:0", "--half-closed-timeout", "10s")
    try:
        base = d.threads()
        for _ in range(1000):
            s, _ = socks5(d.addrs["socks"], holder.port)
            s.shutdown(socket.SHUT_WR)
            s.close()
        time.sleep(1)
        pinned_threads, pinned_fds = d.threads(), d.fds()
        t0 = time.monotonic()
        while d.threads() > base + 2 and time.monotonic() - t0 < 60:
            time.sleep(0.2)
        row("5. 1,000 streams half-closed by applications that leave, to a target "
            "that never answers (`--half-closed-timeout 10s`; default 5 min)",
            f"{pinned_threads} threads and {pinned_fds} fds pinned, then back to "
            f"{d.threads()} threads, {d.fds()} fds {time.monotonic() - t0 + 1:.1f} s "
            f"after the last stream")
    finally:
        d.stop()


def frozen_exit():
    holder = Holder()
    exit_ = Daemon("exit", "--listen", "127.0.0.1:0", "--exit-policy", "accept *:*")
    c = Daemon("client", "--socks", "127.0.0.1:0", "--exit", "%s:%d" % exit_.addrs["link"],
               "--exit-fingerprint", exit_.fingerprint)
    try:
        w0, code0 = timed_user(c.addrs["socks"], holder.port)
        os.kill(exit_.p.pid, 19)  # SIGSTOP
        w1, code1 = timed_user(c.addrs["socks"], holder.port)
        w2, code2 = timed_user(c.addrs["socks"], holder.port)
        os.kill(exit_.p.pid, 18)  # SIGCONT
        t0 = time.monotonic()
        while True:
            w3, code3 = timed_user(c.addrs["socks"], holder.port)
            if code3 == "0x00" or time.monotonic() - t0 > 60:
                break
            time.sleep(0.2)
        row("8. the exit stopped (SIGSTOP), default `--begin-timeout 30s`",
            f"before: {code0} in {w0 * 1000:.1f} ms; the first request of the freeze: "
            f"{code1} in {w1:.1f} s, the link dropped; the next: {code2} in "
            f"{w2 * 1000:.1f} ms; after SIGCONT served again ({code3}) within "
            f"{time.monotonic() - t0:.1f} s")
    finally:
        c.stop()
        os.kill(exit_.p.pid, 18)
        exit_.stop()


ATTACKS = {
    "status-header": status_header,
    "status-idle": status_idle,
    "slowloris": socks_slowloris,
    "usernames": usernames,
    "full-circuit": full_circuit,
    "pinned": pinned,
    "frozen-exit": frozen_exit,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=ATTACKS)
    a = ap.parse_args()
    if not os.path.exists(EXE):
        sys.exit("build first: cargo build --release")
    print("| attack | with the defences (release build, this machine) |")
    print("|---|---|")
    for name in a.only or ATTACKS:
        ATTACKS[name]()


if __name__ == "__main__":
    main()
