#!/usr/bin/env bash
# scripts/rtt.sh: one bulk stream each way across distance (docs/performance.md,
# "Distance"). A user-space delay relay (`halfpipe-bench relay`; this kernel
# has no netem) adds the same delay each way on the one link of each path:
#
#   halfpipe v1     client and exit on a plain link, --flow v1 (§10 windows)
#   halfpipe v2     the same with --flow v2 (§14: congestion window, XOFF/XON)
#   ssh -D          OpenSSH dynamic forwarding; the relay between ssh and sshd
#   socat x2        two socat relays (256 KiB buffers); the relay between them
#   direct          plain TCP; the relay between the bench and its targets
#
# at 0 (loopback, no relay), 5, 20 and 50 ms each way, in one run, and writes
# DIR/rtt.md (MiB/s up and down, and v2's ratios to v1 and to ssh -D).
#
#   scripts/rtt.sh [--out DIR] [--delays "5 20 50"] [--size MiB]
#
# DIR defaults to scripts/results. Everything listens on 127.0.0.1 only, and
# every process started is stopped when the script ends (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=scripts/results
DELAYS="5 20 50"
SIZE=64
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift ;;
        --delays) DELAYS="$2"; shift ;;
        --size) SIZE="$2"; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "rtt: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "rtt: $*" >&2; }
TMP=$(mktemp -d /tmp/halfpipe-rtt.XXXXXX)
PIDS=()
stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
trap 'stop_all; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM
source scripts/ports.sh
source scripts/sshd.sh

cargo build --release --workspace >&2
BIN=${CARGO_TARGET_DIR:-target}/release/halfpipe
BENCH=${CARGO_TARGET_DIR:-target}/release/halfpipe-bench
need=()
command -v socat >/dev/null 2>&1 || need+=(socat)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
        say "could not install ${need[*]}; their rows are left empty"
fi

# relay UPSTREAM DELAY: starts a delay relay in front of 127.0.0.1:UPSTREAM;
# sets RELAY to its port.
relay() {
    "$BENCH" relay --upstream "127.0.0.1:$1" --delay-ms "$2" >"$TMP/relay.out" &
    PIDS+=($!)
    for _ in $(seq 100); do
        RELAY=$(sed -n 's/^relay listening on 127.0.0.1://p' "$TMP/relay.out")
        [ -n "$RELAY" ] && return 0
        sleep 0.1
    done
    say "the relay did not start"; exit 1
}

# mibs FILE SCENARIO: "up down" MiB/s from a bench report.
mibs() {
    python3 - "$1" "$2" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))[sys.argv[2]]
    print("%.1f %.1f" % (d["upload"]["mib_s"], d["download"]["mib_s"]))
except Exception:
    print("- -")
PY
}

# bulk LABEL OUTFILE ARGS...: one stream each way through what ARGS say.
bulk() {
    local label=$1 out=$2
    shift 2
    say "$label"
    "$BENCH" --label "$label" --scenario bulk --size "$SIZE" --json "$@" >"$out" || true
}

sshd_start "$TMP/ssh" || say "ssh -D skipped: $SSH_SKIP"
SSHD_ALIVE=("${PIDS[@]}"); PIDS=()

ROWS=()
for d in 0 $DELAYS; do
    # halfpipe v1 and v2: at 0 a pair on loopback; else the bench's rtt
    # scenario (its own pair, the relay on their link).
    for flow in v1 v2; do
        f=$TMP/hp-$flow-$d.json
        if [ "$d" = 0 ]; then
            free_port L; free_port S
            "$BIN" exit --listen "127.0.0.1:$L" --link plain --flow "$flow" --exit-policy "accept *:*" --log warn >/dev/null 2>&1 &
            PIDS+=($!); wait_listen "$L"
            "$BIN" client --socks "127.0.0.1:$S" --exit "127.0.0.1:$L" --link plain --flow "$flow" --log warn >/dev/null 2>&1 &
            PIDS+=($!); wait_listen "$S"
            bulk "halfpipe $flow, 0 ms" "$f" --socks "127.0.0.1:$S"
            stop_all
            printf -v "hp_$flow" '%s' "$(mibs "$f" bulk)"
        else
            say "halfpipe $flow, $d ms"
            "$BENCH" --label "halfpipe $flow" --direct --scenario rtt --delay-ms "$d" --rtt-size "$SIZE" \
                --flow "$flow" --json >"$f" || true
            printf -v "hp_$flow" '%s' "$(mibs "$f" rtt)"
        fi
    done
    # ssh -D, the relay between ssh and sshd.
    ssh_r="- -"
    if [ -z "$SSH_SKIP" ]; then
        port=$SSHD_PORT
        if [ "$d" != 0 ]; then relay "$SSHD_PORT" "$d"; port=$RELAY; fi
        free_port SOCKS_SSH
        if ssh_socks "$port" "$SOCKS_SSH"; then
            bulk "ssh -D, $d ms" "$TMP/ssh-$d.json" --socks "127.0.0.1:$SOCKS_SSH"
            ssh_r=$(mibs "$TMP/ssh-$d.json" bulk)
        fi
        stop_all
    fi
    # socat x2, the relay between the two socats.
    socat_r="- -"
    if command -v socat >/dev/null 2>&1; then
        free_port T; free_port B; free_port A
        socat -b 262144 -t 30 "TCP-LISTEN:$B,bind=127.0.0.1,reuseaddr,fork" "TCP:127.0.0.1:$T" &
        PIDS+=($!)
        mid=$B
        if [ "$d" != 0 ]; then relay "$B" "$d"; mid=$RELAY; fi
        socat -b 262144 -t 30 "TCP-LISTEN:$A,bind=127.0.0.1,reuseaddr,fork" "TCP:127.0.0.1:$mid" &
        PIDS+=($!)
        wait_listen "$A"
        bulk "socat x2, $d ms" "$TMP/socat-$d.json" --direct --via "127.0.0.1:$A" --target-listen "127.0.0.1:$T"
        socat_r=$(mibs "$TMP/socat-$d.json" bulk)
        stop_all
    fi
    # Direct TCP, the relay between the bench and its targets.
    free_port T
    via=()
    if [ "$d" != 0 ]; then relay "$T" "$d"; via=(--via "127.0.0.1:$RELAY"); fi
    bulk "direct, $d ms" "$TMP/direct-$d.json" --direct "${via[@]}" --target-listen "127.0.0.1:$T"
    direct_r=$(mibs "$TMP/direct-$d.json" bulk)
    stop_all
    ROWS+=("$d|$hp_v1|$hp_v2|$ssh_r|$socat_r|$direct_r")
done
PIDS=("${SSHD_ALIVE[@]}")

mkdir -p "$OUT"
{
    echo "# One bulk stream across distance"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ) on $(hostname) ($(nproc) cores), $SIZE MiB each way, load average at the end $(cut -d' ' -f1 /proc/loadavg). MiB/s, upload / download. Delay: added each way by a user-space relay on the path's one link."
    echo
    echo "| delay each way | halfpipe v1 | halfpipe v2 | ssh -D | socat x2 | direct TCP | v2 / v1 | v2 / ssh -D |"
    echo "|---|---|---|---|---|---|---|---|"
    for r in "${ROWS[@]}"; do
        python3 - "$r" <<'PY'
import sys
d, v1, v2, ssh, socat, direct = sys.argv[1].split("|")
def pair(s): return " / ".join(s.split())
def ratio(a, b):
    try:
        a, b = [float(x) for x in a.split()], [float(x) for x in b.split()]
        return " / ".join("%.2fx" % (x / y) for x, y in zip(a, b))
    except Exception:
        return "-"
print("| %s ms | %s | %s | %s | %s | %s | %s | %s |" % (d, pair(v1), pair(v2), pair(ssh), pair(socat), pair(direct), ratio(v2, v1), ratio(v2, ssh)))
PY
    done
} >"$OUT/rtt.md"
say "wrote $OUT/rtt.md"
cat "$OUT/rtt.md"
