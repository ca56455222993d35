#!/usr/bin/env bash
# scripts/compare.sh: halfpipe side by side with what users have instead,
# on this machine, in one run (docs/performance.md).
#
#   scripts/compare.sh [--quick] [--hold LIST] [--out DIR]
#
# Measures, one after the other, each with `halfpipe-bench`:
#
#   direct               plain TCP to the bench's targets: the limit.
#   socat x2             two socat relays in a chain, 256 KiB buffers.
#   ssh -D               OpenSSH dynamic forwarding to a throwaway sshd.
#   halfpipe client+exit two processes joined by a loopback link: plain
#                        (--link plain) with flow control v1 and v2, and
#                        TLS (the default link) with the default flow.
#   halfpipe run         both edges in one process (its link is internal:
#                        TLS over loopback, as the default).
#
# and writes DIR/compare.json (every run's report), DIR/compare.md (tables
# with ratios to direct TCP and to the socat chain) and DIR/compare.svg (the
# chart), DIR defaulting to scripts/results.
#
#   --quick      small sizes, about a minute in all: for smoke-checking the
#                tooling. Its numbers are not comparable with a full run.
#   --hold LIST  hold scenario stream counts (default 1000; --quick: 100).
#                Counts above 7000 need more memory mappings and PIDs than
#                a stock kernel gives (two threads per stream per halfpipe
#                process): the script then raises vm.max_map_count and
#                kernel.pid_max for the run and restores them at the end.
#   --out DIR    where to write the results.
#
# Everything listens on 127.0.0.1 only. Every process the script starts is
# stopped when it ends, however it ends (trap). Tools that are missing
# (socat, sshd) are installed with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
HOLD=""
OUT=scripts/results
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --hold) HOLD="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$QUICK" = 1 ]; then
    SIZE=32; COUNT=300; RTT_SIZE=4; HOLD=${HOLD:-100}
else
    SIZE=1024; COUNT=5000; RTT_SIZE=64; HOLD=${HOLD:-1000}
fi
COMMON=(--size "$SIZE" --streams 8 --count "$COUNT" --concurrency "1,32"
        --rtt-size "$RTT_SIZE" --delay-ms 5 --json)

say() { echo "compare: $*" >&2; }

# ------------------------------------------------------------ clean-up

TMP=$(mktemp -d /tmp/halfpipe-compare.XXXXXX)
PIDS=()
SYSCTL_RESTORE=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for p in "${SYSCTL_RESTORE[@]}"; do sysctl -q -w "$p" >/dev/null 2>&1 || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Stops the processes started since the last call (between runs, so that
# one implementation's idle processes do not share the machine with the
# next one's measurement).
stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}

source scripts/ports.sh
source scripts/sshd.sh

# ------------------------------------------------------------ set-up

NOTES=()
[ "$QUICK" = 1 ] && NOTES+=("--quick run: small sizes for smoke-checking the tools; not a measurement")

say "cargo build --release"
cargo build --release
BIN=${CARGO_TARGET_DIR:-target}/release/halfpipe
BENCH_BIN=${CARGO_TARGET_DIR:-target}/release/halfpipe-bench

# Descriptors: every process started from here inherits the hard limit.
ulimit -n "$(ulimit -Hn)" || true

need=()
command -v socat >/dev/null 2>&1 || need+=(socat)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }; then
        say "could not install ${need[*]}; the runs that need them are skipped"
    fi
fi

# Large hold counts: more mappings and PIDs for the run, restored at exit.
max_hold=0
for h in ${HOLD//,/ }; do [ "$h" -gt "$max_hold" ] && max_hold=$h; done
if [ "$max_hold" -gt 7000 ]; then
    for kv in vm.max_map_count=1048576 kernel.pid_max=4194304; do
        key=${kv%%=*}
        old=$(sysctl -n "$key")
        if [ "$old" -lt "${kv#*=}" ]; then
            if sysctl -q -w "$kv" >/dev/null 2>&1; then
                SYSCTL_RESTORE+=("$key=$old")
                say "raised $key from $old to ${kv#*=} for this run"
            else
                say "cannot raise $key (${kv#*=}): hold $max_hold will hit the kernel's limits"
                NOTES+=("$key could not be raised: large hold counts hit the kernel's default limits")
            fi
        fi
    done
fi

load=$(cut -d' ' -f1 /proc/loadavg)
NOTES+=("load average at start: $load (a busy machine makes every number noisy)")
say "load average $load"

RUNS=()
# run LABEL OUTFILE ARGS...: one `halfpipe-bench` run into OUTFILE.
run() {
    local label=$1 out=$2
    shift 2
    say "measuring: $label"
    if "$BENCH_BIN" --label "$label" "${COMMON[@]}" "$@" >"$out"; then
        :
    else
        say "$label: some scenarios failed (see the errors in the report)"
    fi
    if [ -s "$out" ]; then
        RUNS+=("$out")
    else
        NOTES+=("$label: the bench produced no report")
    fi
}

# ------------------------------------------------------------ the runs

# 1. Direct TCP: the bench straight to its own targets. No proxy process,
#    so no hold (nothing to measure) and no rtt (halfpipe only).
run "direct" "$TMP/direct.json" --direct --scenario bulk,parallel,setup,slow

# 2. Two socat relays in a chain. socat is a TCP relay, not a SOCKS proxy,
#    so the chain is put in front of the targets: the bench's targets listen
#    on a fixed port T, socat A forwards to socat B, B to T, and the bench
#    connects with plain TCP to A (--direct --via A). One header on each
#    connection tells the targets which target is meant, so every scenario
#    reaches the same targets as through a SOCKS proxy. This measures the
#    same work as halfpipe client+exit without a protocol: every byte
#    crosses two user-space relays and three TCP connections. (socat's
#    SOCKS4A mode is a SOCKS *client*, so it cannot play the proxy.) What
#    socat does not do is a SOCKS handshake: its setup latency is one
#    loopback round trip lighter, and it forks a process per connection.
#    -b 262144: 256 KiB buffers (the default 8 KiB is far slower);
#    -t 30: after one direction's EOF socat waits 30 s (default 0.5 s) for
#    the other, so half-closed request/response streams keep their replies.
#    Hold: socat's `fork` costs a process per connection per relay, so its
#    hold runs only up to 1000 streams; RSS sums over all those processes
#    (shared pages count in each; PSS is beside it).
if command -v socat >/dev/null 2>&1; then
    free_port T; free_port B; free_port A
    SOCAT=(socat -b 262144 -t 30)
    "${SOCAT[@]}" "TCP-LISTEN:$B,bind=127.0.0.1,reuseaddr,fork,backlog=4096" "TCP:127.0.0.1:$T" &
    PIDS+=($!); S2=$!
    "${SOCAT[@]}" "TCP-LISTEN:$A,bind=127.0.0.1,reuseaddr,fork,backlog=4096" "TCP:127.0.0.1:$B" &
    PIDS+=($!); S1=$!
    wait_listen "$A" && wait_listen "$B"
    socat_hold=""
    for h in ${HOLD//,/ }; do [ "$h" -le 1000 ] && socat_hold="$socat_hold${socat_hold:+,}$h"; done
    scen=bulk,parallel,setup,slow
    if [ -n "$socat_hold" ]; then scen=$scen,hold; fi
    run "socat x2 (-b 262144)" "$TMP/socat.json" --direct --via "127.0.0.1:$A" \
        --target-listen "127.0.0.1:$T" --scenario "$scen" --hold "${socat_hold:-1}" \
        --pid "$S1" --pid "$S2"
    [ "$socat_hold" = "${HOLD}" ] || NOTES+=("socat x2: hold only up to 1000 streams (a process per connection per relay)")
    stop_all
else
    NOTES+=("socat x2: skipped, socat is not installed")
fi

# 3. ssh -D to a throwaway sshd on loopback: host and user keys made here,
#    sshd -f with a config of our own on a free port, key login only, the
#    default cipher (what users get). Expect a slow setup at concurrency 1
#    (about 44 ms per stream here): a half-closed request makes ssh send
#    channel data and channel EOF back to back, which looks like Nagle's
#    algorithm meeting a delayed ACK on its transport; with 32 streams
#    sharing the connection the ACKs come sooner. It is what users of
#    ssh -D see, so it is measured as it is.
ssh_skip=""
if sshd_start "$TMP/ssh"; then
    free_port SOCKS_SSH
    if ssh_socks "$SSHD_PORT" "$SOCKS_SSH"; then
        run "ssh -D" "$TMP/ssh.json" --socks "127.0.0.1:$SOCKS_SSH" \
            --scenario bulk,parallel,setup,hold,slow --hold "$HOLD" \
            --pid "$SSH_PID" --pid "$SSHD_PID"
    fi
fi
ssh_skip=$SSH_SKIP
stop_all
if [ -n "$ssh_skip" ]; then
    say "ssh -D skipped: $ssh_skip"
    NOTES+=("ssh -D: skipped, $ssh_skip")
fi

# 4. halfpipe client + exit as separate processes, on a plain link, once
#    with flow control v1 (docs/protocol.md §10) and once with v2 (§14).
#    The rtt scenario runs here: it starts its own client and exit (plain,
#    the same flow control) with a delay relay between.
HP=(--log warn --grace 2s --max-streams-per-circuit 20000)
for flow in v1 v2; do
    free_port L; free_port S
    "$BIN" exit --listen "127.0.0.1:$L" --link plain --flow "$flow" --exit-policy "accept *:*" "${HP[@]}" >"$TMP/exit-$flow.log" 2>&1 &
    PIDS+=($!); EXIT_PID=$!
    wait_listen "$L"
    "$BIN" client --socks "127.0.0.1:$S" --exit "127.0.0.1:$L" --link plain --flow "$flow" "${HP[@]}" >"$TMP/client-$flow.log" 2>&1 &
    PIDS+=($!); CLIENT_PID=$!
    wait_listen "$S"
    run "halfpipe client+exit $flow" "$TMP/halfpipe-pair-$flow.json" --socks "127.0.0.1:$S" \
        --scenario all --hold "$HOLD" --flow "$flow" --pid "$CLIENT_PID" --pid "$EXIT_PID"
    stop_all
done

# 4b. The same over a TLS link (docs/protocol.md §13): identities of the
#     run's own, the client pinning the exit's fingerprint.
ID="$TMP/identity"
FP=$("$BIN" exit --print-fingerprint --data-dir "$ID")
free_port L; free_port S
"$BIN" exit --listen "127.0.0.1:$L" --data-dir "$ID" --exit-policy "accept *:*" "${HP[@]}" >"$TMP/exit-tls.log" 2>&1 &
PIDS+=($!); EXIT_PID=$!
wait_listen "$L"
"$BIN" client --socks "127.0.0.1:$S" --exit "127.0.0.1:$L" --exit-fingerprint "$FP" \
    --data-dir "$ID" "${HP[@]}" >"$TMP/client-tls.log" 2>&1 &
PIDS+=($!); CLIENT_PID=$!
wait_listen "$S"
run "halfpipe client+exit tls" "$TMP/halfpipe-pair-tls.json" --socks "127.0.0.1:$S" \
    --scenario bulk,parallel,setup,hold,slow --hold "$HOLD" --pid "$CLIENT_PID" --pid "$EXIT_PID"
stop_all

# 5. halfpipe run: both edges in one process.
free_port S
"$BIN" run --socks "127.0.0.1:$S" --data-dir "$ID" "${HP[@]}" >"$TMP/run.log" 2>&1 &
PIDS+=($!); RUN_PID=$!
wait_listen "$S"
run "halfpipe run" "$TMP/halfpipe-run.json" --socks "127.0.0.1:$S" \
    --scenario bulk,parallel,setup,hold,slow --hold "$HOLD" --pid "$RUN_PID"
stop_all

# ------------------------------------------------------------ results

mkdir -p "$OUT"
note_args=()
for n in "${NOTES[@]}"; do note_args+=("--note=$n"); done
"$BENCH_BIN" --combine "${RUNS[@]}" "${note_args[@]}" >"$OUT/compare.json"
"$BENCH_BIN" --markdown "$OUT/compare.json" >"$OUT/compare.md"
"$BENCH_BIN" --plot "$OUT/compare.json" "$OUT/compare.svg"
say "wrote $OUT/compare.json, $OUT/compare.md, $OUT/compare.svg"
cat "$OUT/compare.md"
