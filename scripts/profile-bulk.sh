#!/usr/bin/env bash
# scripts/profile-bulk.sh: where a bulk stream's time goes
# (docs/performance.md, "Where the time goes").
#
#   scripts/profile-bulk.sh [--size MiB] [--rounds N]
#
# Runs `halfpipe-bench --scenario bulk` through two relays, the rounds
# interleaved so that a busy minute hits both alike:
#
#   socat x2       two socat relays in a chain, 256 KiB buffers (the
#                  practical two-hop limit here, as in compare.sh).
#   halfpipe       client + exit as two processes, as built, on a plain link.
#
# (An earlier version also ran a measurement build whose windows were 100
# times wider; no build changes protocol constants any more, and that
# result is recorded in docs/performance.md.)
#
# Each relay process runs under /usr/bin/time, which reports what the whole
# process used when it exits, threads that ended included: CPU seconds,
# context switches (voluntary + involuntary) and minor page faults. The
# script prints, per relay, the medians over the rounds of upload and
# download MiB/s, CPU seconds per GiB carried, context switches per MiB and
# page faults per MiB, all of both relay processes together. The bench's own
# processes are not counted. Loopback only; every process it starts is
# stopped when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=1024
ROUNDS=3
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "profile-bulk: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "profile-bulk: $*" >&2; }

need=()
command -v socat >/dev/null 2>&1 || need+=(socat)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

say "cargo build --release"
cargo build --release
BIN=${CARGO_TARGET_DIR:-target}/release/halfpipe
BENCH_BIN=${CARGO_TARGET_DIR:-target}/release/halfpipe-bench

TMP=$(mktemp -d /tmp/halfpipe-profile.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -INT -- "-$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Each relay gets its own process group, so that SIGINT reaches it through
# /usr/bin/time (which ignores SIGINT while it waits, then reports).
set -m

source scripts/ports.sh

# timed FILE CMD...: starts CMD under /usr/bin/time, reporting to FILE.
timed() {
    local file=$1
    shift
    /usr/bin/time -f "%U %S %w %c %R" -o "$file" "$@" >/dev/null 2>&1 &
    PIDS+=("$!")
}

# Stops the relays of this round; their reports are then written.
stop_relays() {
    local p
    for p in "${PIDS[@]}"; do kill -INT -- "-$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}

# measure LABEL: after the relays were started (with `timed`) and BENCH
# set, runs the bench, stops the relays and appends one line to RESULTS:
# label, upload MiB/s, download MiB/s, CPU s/GiB, switches/MiB, faults/MiB.
RESULTS=$TMP/results
measure() {
    local label=$1 out=$TMP/bench.out
    "${BENCH[@]}" --scenario bulk --size "$SIZE" >"$out" 2>&1 || {
        say "$label: the bench failed:"; cat "$out" >&2; stop_relays; return
    }
    sleep 0.5 # let socat reap its per-connection children
    stop_relays
    local up down
    up=$(awk '$1 == "upload" {print $4}' "$out")
    down=$(awk '$1 == "download" {print $4}' "$out")
    cat "$TMP"/*.time | awk -v label="$label" -v up="$up" -v down="$down" -v mib=$((2 * SIZE)) '
        { cpu += $1 + $2; cs += $3 + $4; pf += $5 }
        END { printf "%s %s %s %.3f %.2f %.2f\n", label, up, down, cpu / (mib / 1024), cs / mib, pf / mib }' >>"$RESULTS"
    say "  $(tail -n 1 "$RESULTS")"
    rm -f "$TMP"/*.time
}

run_socat() {
    local t m a
    free_port t; free_port m; free_port a
    timed "$TMP/s2.time" socat -b 262144 -t 30 "TCP-LISTEN:$m,bind=127.0.0.1,reuseaddr,fork" "TCP:127.0.0.1:$t"
    timed "$TMP/s1.time" socat -b 262144 -t 30 "TCP-LISTEN:$a,bind=127.0.0.1,reuseaddr,fork" "TCP:127.0.0.1:$m"
    wait_listen "$m" && wait_listen "$a" || { say "socat did not start listening"; exit 1; }
    BENCH=("$BENCH_BIN" --direct --via "127.0.0.1:$a" --target-listen "127.0.0.1:$t")
    measure "socat-x2"
}

# run_halfpipe LABEL BINARY: client + exit of BINARY, on a plain link (the
# relay's own work, as the earlier rounds measured it; compare.sh has TLS).
run_halfpipe() {
    local label=$1 bin=$2 link socks
    free_port link; free_port socks
    timed "$TMP/exit.time" "$bin" exit --listen "127.0.0.1:$link" --link plain --exit-policy "accept *:*" --log warn
    wait_listen "$link" || { say "$label: the exit did not start listening"; exit 1; }
    timed "$TMP/client.time" "$bin" client --socks "127.0.0.1:$socks" --exit "127.0.0.1:$link" --link plain --log warn
    wait_listen "$socks" || { say "$label: the client did not start listening"; exit 1; }
    BENCH=("$BENCH_BIN" --socks "127.0.0.1:$socks")
    measure "$label"
}

say "load average $(cut -d' ' -f1 /proc/loadavg); $ROUNDS rounds of $SIZE MiB each way"
for r in $(seq "$ROUNDS"); do
    say "round $r: socat x2"
    run_socat
    say "round $r: halfpipe"
    run_halfpipe "halfpipe" "$BIN"
done

echo "bulk, $SIZE MiB each way, medians of $ROUNDS rounds; CPU, switches and faults are both relay processes'"
sort -k1,1 -s "$RESULTS" | awk '
    function median(a, n,   i, j, t) {
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function flush(   k) {
        if (n == 0) return
        printf "%-14s %9.0f %9.0f %10.2f %12.1f %11.1f\n", label, median(u, n), median(d, n), median(c, n), median(s, n), median(f, n)
        n = 0
    }
    BEGIN { printf "%-14s %9s %9s %10s %12s %11s\n", "relay", "up MiB/s", "dn MiB/s", "CPU s/GiB", "switches/MiB", "faults/MiB" }
    $1 != label { flush(); label = $1 }
    { n++; u[n] = $2; d[n] = $3; c[n] = $4; s[n] = $5; f[n] = $6 }
    END { flush() }'
