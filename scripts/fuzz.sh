#!/usr/bin/env bash
# Fuzz halfpipe's sans-IO core with cargo-fuzz (libFuzzer): every target in
# tests/fuzz/fuzz_targets/ runs for SECONDS (default 60), then a table of
# what libFuzzer reported is printed. What each target checks is at the top
# of its source file; docs/robustness.md, "Fuzzing", has the overview.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Installs cargo-fuzz if it is missing. The only toolchain here is stable,
# and cargo-fuzz passes nightly-only -Z flags, so RUSTC_BOOTSTRAP=1 is set
# for the fuzz build (it affects nothing outside this script). Builds with
# AddressSanitizer; if that build fails, it falls back to no sanitizer
# (`-s none`) and says so: the targets are safe Rust, so the sanitizer adds
# little beyond catching bugs in dependencies' unsafe code.
#
# Inputs libFuzzer finds interesting accumulate in tests/fuzz/corpus/TARGET
# (git-ignored), seeded from the committed tests/fuzz/seeds/TARGET. A crash
# stops that target's run and leaves the input in tests/fuzz/artifacts/TARGET/
# (git-ignored); reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz TARGET FILE
# minimise it with `cargo fuzz tmin` the same way, fix the bug and turn the
# input into a regression test. The script exits 1 if any target crashed.
#
# Environment: FUZZ_NICE (default 10) is the nice level of the fuzzing
# processes; FUZZ_SANITIZER=none skips the AddressSanitizer attempt.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
case $seconds in
    '' | *[!0-9]*)
        echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
        exit 2
        ;;
esac
shift $(($# > 0 ? 1 : 0))

fuzz_dir=tests/fuzz
export RUSTC_BOOTSTRAP=1
nice_level=${FUZZ_NICE:-10}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (a few minutes)"
    cargo install cargo-fuzz --locked
fi

chosen=("$@")
if [ ${#chosen[@]} -gt 0 ]; then
    targets=("${chosen[@]}")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
fi

# Build the targets once; the runs below then start at once.
sanitizer=${FUZZ_SANITIZER:-address}
build() {
    if [ ${#chosen[@]} -eq 0 ]; then
        nice -n "$nice_level" cargo fuzz build --fuzz-dir "$fuzz_dir" -s "$1"
    else
        for t in "${chosen[@]}"; do
            nice -n "$nice_level" cargo fuzz build --fuzz-dir "$fuzz_dir" -s "$1" "$t" || return 1
        done
    fi
}
echo "fuzz: building ${#targets[@]} targets (sanitizer: $sanitizer)"
if ! build "$sanitizer"; then
    if [ "$sanitizer" = none ]; then
        echo "fuzz: build failed" >&2
        exit 1
    fi
    echo "fuzz: the AddressSanitizer build failed on this toolchain; falling back to -s none (no sanitizer)" >&2
    sanitizer=none
    build none
fi

host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=$fuzz_dir/target/$host/release
logs=$fuzz_dir/target/fuzz-logs
mkdir -p "$logs"
rows=()
crashed=0
for t in "${targets[@]}"; do
    corpus=$fuzz_dir/corpus/$t
    artifacts=$fuzz_dir/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    dirs=("$corpus")
    [ -d "$fuzz_dir/seeds/$t" ] && dirs+=("$fuzz_dir/seeds/$t")
    extra=()
    [ -f "$fuzz_dir/dicts/$t.dict" ] && extra+=("-dict=$fuzz_dir/dicts/$t.dict")
    before=$(find "$artifacts" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
    log=$logs/$t.log
    echo "fuzz: $t for ${seconds}s (log: $log)"
    start=$(date +%s)
    set +e
    # -use_value_profile=1 rewards inputs that bring compared values closer
    # (lengths, ports, window counts): without it stream_state did not reach
    # the early circuit SENDME bug in three 2-3 minute runs; with it, in
    # about 9,000 executions. The binary built above is run directly (what
    # `cargo fuzz run` runs), so that a source edit in the meantime cannot
    # start a rebuild inside the timed run and every target tests the same
    # build.
    nice -n "$nice_level" "$bin_dir/$t" -artifact_prefix="$artifacts/" \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -use_value_profile=1 "${extra[@]}" \
        "${dirs[@]}" >"$log" 2>&1
    status=$?
    set -e
    took=$(($(date +%s) - start))
    after=$(find "$artifacts" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
    crashes=$((after - before))
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        # A failure that left no input behind (e.g. the build or libFuzzer
        # itself): count it, the log says what happened.
        crashes="fail($status)"
        crashed=1
    elif [ "$crashes" -gt 0 ]; then
        crashed=1
        grep -m1 -E "panicked at|ERROR: (libFuzzer|AddressSanitizer)" "$log" | sed "s/^/fuzz: $t: /" >&2 || true
        grep -m1 "Test unit written to" "$log" | sed "s/^/fuzz: $t: /" >&2 || true
    fi
    # The figures are libFuzzer's own: executions from -print_final_stats,
    # corpus size from its last status line (units / bytes in memory).
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
    rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
    corp=$(grep -oE 'corp: [0-9]+/[0-9]+[bKkMm]?b?' "$log" | tail -1 | sed 's/corp: //')
    files=$(find "$corpus" -type f | wc -l)
    rows+=("$(printf '%-16s %8s %14s %9s %13s %11s %8s' "$t" "$took" "${execs:-?}" "${rate:-?}" "${corp:-?}" "$files" "$crashes")")
done

echo
echo "fuzz results (sanitizer: $sanitizer, ${seconds}s per target, $(date -u +%Y-%m-%dT%H:%MZ))"
printf '%-16s %8s %14s %9s %13s %11s %8s\n' target seconds executions exec/s corpus corpus-files crashes
for r in "${rows[@]}"; do
    echo "$r"
done
exit $crashed
