#!/usr/bin/env bash
# scripts/tls-bulk.sh: one bulk stream each way through a TLS pair, ssh -D
# and a plain pair, taken in turn for a few rounds (docs/performance.md,
# "TLS links"): interleaving keeps the machine's phase from favouring one.
#
#   scripts/tls-bulk.sh [ROUNDS] [MiB]        (defaults: 3 rounds, 1024 MiB)
#
# Prints "name upload download" in MiB/s, a line per path per round. The
# TLS pair runs the defaults (TLS link, flow v2, the exit's fingerprint
# pinned); the plain pair has --link plain. Everything listens on
# 127.0.0.1 only, and every process started is stopped at the end (trap).
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SIZE=${2:-1024}
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done; PIDS=(); }
trap stop_all EXIT
source scripts/ports.sh
source scripts/sshd.sh
cargo build --release -q -p halfpipe -p halfpipe-bench
BIN=target/release/halfpipe
B=target/release/halfpipe-bench
TMP=$(mktemp -d)
sshd_start "$TMP/ssh" || { echo "ssh: $SSH_SKIP"; exit 1; }
free_port SS
ssh_socks "$SSHD_PORT" "$SS" || { echo "$SSH_SKIP"; exit 1; }
ID=$TMP/id
FP=$($BIN exit --print-fingerprint --data-dir "$ID")
free_port L1; free_port S1; free_port L2; free_port S2
$BIN exit --listen 127.0.0.1:$L1 --data-dir "$ID" --exit-policy "accept *:*" --log warn >/dev/null 2>&1 & PIDS+=($!)
$BIN exit --listen 127.0.0.1:$L2 --link plain --exit-policy "accept *:*" --log warn >/dev/null 2>&1 & PIDS+=($!)
wait_listen $L1; wait_listen $L2
$BIN client --socks 127.0.0.1:$S1 --exit 127.0.0.1:$L1 --exit-fingerprint "$FP" --data-dir "$ID" --log warn >/dev/null 2>&1 & PIDS+=($!)
$BIN client --socks 127.0.0.1:$S2 --exit 127.0.0.1:$L2 --link plain --log warn >/dev/null 2>&1 & PIDS+=($!)
wait_listen $S1; wait_listen $S2
echo "# $(date -u +%FT%TZ), $(git rev-parse --short HEAD), load $(cut -d' ' -f1 /proc/loadavg)"
for _ in $(seq "$ROUNDS"); do
  for what in tls:$S1 ssh:$SS plain:$S2; do
    name=${what%%:*}; port=${what#*:}
    $B --socks 127.0.0.1:$port --scenario bulk --size "$SIZE" --json 2>/dev/null | python3 -c "
import json,sys; d=json.load(sys.stdin)['bulk']; print('$name', round(d['upload']['mib_s']), round(d['download']['mib_s']))"
  done
done
