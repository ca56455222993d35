#!/usr/bin/env bash
# scripts/mutants.sh: mutation testing of halfpipe-proto with the
# conformance kit as the only test. cargo-mutants mutates the proto crate,
# rebuilds halfpipe, and runs tests/conform_kit.rs, which runs a kit built
# here first from the unmutated tree against that build. A mutant is
# killed when a case fails. The same test runs first on the unmutated
# tree (the baseline: every case must pass); cargo-mutants' own baseline
# is skipped, since it runs the mutated package's tests, not halfpipe's.
#
#   scripts/mutants.sh [--shard K/N] [--out DIR]    (DIR defaults to scripts/results)
#
# Every mutant costs a rebuild and a run of the kit (minutes), so a whole
# run of the crate's mutants takes days on two cores: --shard K/N runs
# every N-th mutant (round-robin over the list, so across all files).
# Cases that only wait on halfpipe's own clocks (the handshake deadline,
# the connect timeout, the shutdown grace, relinking) are left out: no
# proto mutant reaches them. Cases that need root are skipped without it
# and then kill nothing.
#
# Needs cargo-mutants: `cargo install cargo-mutants`. Results: DIR/mutants.out
# (cargo-mutants' own files: caught.txt, missed.txt, unviable.txt, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARD=0/1
OUT=scripts/results
while [ $# -gt 0 ]; do
    case "$1" in
        --shard) SHARD=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "usage: scripts/mutants.sh [--shard K/N] [--out DIR]" >&2; exit 2 ;;
    esac
done
command -v cargo-mutants >/dev/null || {
    echo "scripts/mutants.sh: needs cargo-mutants (cargo install cargo-mutants)" >&2
    exit 2
}
mkdir -p "$OUT"
cargo build -q -p halfpipe-conform
mkdir -p target/mutants-kit
cp target/debug/halfpipe-conform target/mutants-kit/halfpipe-conform
export HALFPIPE_CONFORM_BIN=$PWD/target/mutants-kit/halfpipe-conform
export HALFPIPE_CONFORM_ARGS="--skip R1.6 --skip R5.9 --skip R8.5 --skip R11.16 --total 900"
echo "mutants: baseline, the unmutated tree"
cargo test -q -p halfpipe --test conform_kit -- --ignored
cargo mutants --workspace --file "crates/halfpipe-proto/**" --test-package halfpipe \
    --shard "$SHARD" --sharding round-robin --baseline skip --timeout 1200 --output "$OUT" \
    -- --test conform_kit -- --ignored
