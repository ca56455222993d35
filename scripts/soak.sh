#!/usr/bin/env bash
# scripts/soak.sh: the long soak (docs/robustness.md, "Soak").
#
#   scripts/soak.sh [MINUTES] [-- EXTRA ARGS FOR `halfpipe-bench soak`]
#
# Builds the release binary, starts `halfpipe exit` and `halfpipe client`
# as two processes on loopback, and runs `halfpipe-bench soak` through them
# for MINUTES (default 10): 1,000 half-closed request/response streams in
# flight at once, sizes 1 byte to 4 MiB (log-uniform), a random half-close
# order per stream, every byte checked with SHA-256 at both ends. It prints
# streams completed, bytes verified, bytes lost or corrupted (must be 0),
# and each daemon's threads, open descriptors and RSS at the start and the
# end (threads and descriptors must return to the baseline).
#
# Environment: SOAK_STREAMS (1000), SOAK_MAX_SIZE (4MiB), SOAK_SEED (from
# the clock; printed), SOAK_CIRCUITS (the client's --circuits, 1),
# SOAK_NICE (10: the run leaves the CPU to others first). Extra arguments
# after `--` go to `halfpipe-bench soak` (say `-- --json`).
#
# Everything listens on 127.0.0.1 only. Every process the script starts is
# stopped when it ends, however it ends (trap). The exit status is the
# soak's: 0 when every stream completed intact and the counts came back.
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=10
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    case "$1" in
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *[!0-9]*|'') echo "soak: MINUTES must be a whole number, not $1 (see --help)" >&2; exit 2 ;;
    esac
    MINUTES=$1
    shift
fi
[ "${1:-}" = "--" ] && shift
EXTRA=("$@")
[ "$MINUTES" -ge 1 ] || { echo "soak: MINUTES must be at least 1" >&2; exit 2; }

STREAMS=${SOAK_STREAMS:-1000}
MAX_SIZE=${SOAK_MAX_SIZE:-4MiB}
CIRCUITS=${SOAK_CIRCUITS:-1}
NICE=${SOAK_NICE:-10}
SEED_ARGS=()
[ -n "${SOAK_SEED:-}" ] && SEED_ARGS=(--seed "$SOAK_SEED")

say() { echo "soak: $*" >&2; }

TMP=$(mktemp -d /tmp/halfpipe-soak.XXXXXX)
PIDS=()
KEEP_LOGS=0
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "$KEEP_LOGS" = 1 ]; then
        say "the daemons' logs are kept in $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "cargo build --release"
nice -n "$NICE" cargo build --release
BIN=${CARGO_TARGET_DIR:-target}/release/halfpipe
BENCH_BIN=${CARGO_TARGET_DIR:-target}/release/halfpipe-bench

# Every stream costs a descriptor in each daemon and two in the bench.
ulimit -n "$(ulimit -Hn)" || true

# Waits until FILE has a line "PREFIX ADDR" and prints ADDR.
addr_from() {
    local file=$1 prefix=$2 pid=$3 a
    for _ in $(seq 200); do
        a=$(sed -n "s/.*$prefix \([0-9.]*:[0-9]*\).*/\1/p" "$file" 2>/dev/null | head -n1)
        if [ -n "$a" ]; then echo "$a"; return 0; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    say "no \"$prefix\" from pid $pid; its log:"
    cat "$file" "$file.err" >&2 || true
    return 1
}

# Job control: each daemon in a process group of its own, so that it gets
# the signals this script sends and not the terminal's Ctrl-C directly.
set -m
# More stream slots per circuit than streams, at both edges: a stream that
# has ended for the application may hold its slot a moment longer, and the
# default (1000) would then refuse the next one (END(RESOURCELIMIT), SOCKS
# 0x01). Log level info: refusals and limits show, streams do not.
HP=(--log info --grace 2s --max-streams-per-circuit $((STREAMS * 2)))
nice -n "$NICE" "$BIN" exit --listen 127.0.0.1:0 --exit-policy "accept *:*" "${HP[@]}" \
    >"$TMP/exit.out" 2>"$TMP/exit.out.err" &
EXIT_PID=$!; PIDS+=("$EXIT_PID")
LINK=$(addr_from "$TMP/exit.out" "link listening on" "$EXIT_PID")
# The link is TLS (the default): the client pins the exit's fingerprint,
# which the exit printed before its address.
FP=$(sed -n 's/^fingerprint: //p' "$TMP/exit.out")
nice -n "$NICE" "$BIN" client --socks 127.0.0.1:0 --exit "$LINK" --exit-fingerprint "$FP" \
    --circuits "$CIRCUITS" "${HP[@]}" >"$TMP/client.out" 2>"$TMP/client.out.err" &
CLIENT_PID=$!; PIDS+=("$CLIENT_PID")
SOCKS=$(addr_from "$TMP/client.out" "SOCKS listening on" "$CLIENT_PID")
set +m
say "exit pid $EXIT_PID (link $LINK), client pid $CLIENT_PID (SOCKS $SOCKS, $CIRCUITS circuit(s))"
say "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

CMD=(nice -n "$NICE" "$BENCH_BIN" soak --socks "$SOCKS" --streams "$STREAMS"
     --duration "${MINUTES}m" --max-size "$MAX_SIZE" --pids "$CLIENT_PID,$EXIT_PID"
     "${SEED_ARGS[@]}" "${EXTRA[@]}")
say "${CMD[*]}"
status=0
"${CMD[@]}" || status=$?

say "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
for d in exit client; do
    n=$(grep -c -E "WARN|ERROR" "$TMP/$d.out.err" || true)
    if [ "$n" -gt 0 ]; then
        say "halfpipe $d logged $n warnings or errors; the last ones:"
        grep -E "WARN|ERROR" "$TMP/$d.out.err" | tail -n 5 >&2
    fi
done
# The daemons must still be there, and stop cleanly.
for p in "$CLIENT_PID" "$EXIT_PID"; do
    if ! kill -0 "$p" 2>/dev/null; then
        say "daemon $p is gone"
        status=1
    fi
done
kill "$CLIENT_PID" "$EXIT_PID" 2>/dev/null || true
for p in "$CLIENT_PID" "$EXIT_PID"; do
    rc=0; wait "$p" || rc=$?
    if [ "$rc" -ne 0 ]; then
        say "daemon $p exited with status $rc after SIGTERM"
        status=1
    fi
done
PIDS=()
[ "$status" -eq 0 ] || KEEP_LOGS=1
exit "$status"
