#!/usr/bin/env bash
# scripts/fuzz.sh [SECS]: run every cargo-fuzz target in fuzz/ for SECS
# seconds each (default 60). `make fuzz` runs it with $FUZZ_SECS (default 60),
# `make fuzz-smoke` (CI) with 10.
#
# Each target first replays its committed seeds (fuzz/seeds/TARGET) and the
# local corpus (fuzz/corpus/TARGET, git-ignored), so the seeds are regression
# tests; then libFuzzer mutates for SECS seconds. A crash leaves its input in
# fuzz/artifacts/TARGET/ and fails the target; the script goes on with the
# next target and exits non-zero at the end. The last line is
# `fuzz: N passed, M failed`.
#
# cargo-fuzz is installed from crates.io if missing. It needs nightly rustc
# flags (-Zsanitizer, sancov); the machine has a stable toolchain only, so
# this sets RUSTC_BOOTSTRAP=1. If cargo-fuzz cannot be installed or cannot
# build the targets, the script says so and falls back to a non-guided loop:
# `cargo test` replays the seeds, then feeds SECS seconds of random and
# mutated-seed inputs per target (fuzzing::tests::random_inputs).
#
# Knobs:
#   FUZZ_SANITIZER   cargo-fuzz sanitizer (default none: the targets are
#                    safe Rust; `address` works too, builds slower)
#   FUZZ_FALLBACK=1  skip cargo-fuzz and run the fallback loop
#   FUZZ_TARGETS     space-separated subset of the targets
#   CARGO_TARGET_DIR if set, cargo-fuzz builds under $CARGO_TARGET_DIR/cargo-fuzz
set -euo pipefail

SECS="${1:-60}"
case "$SECS" in
    '' | *[!0-9]*) echo "usage: $0 [SECS]" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_DIR="$ROOT/fuzz"
ALL_TARGETS=(direction relay_pair config proxy_header health_reply client_hello)
read -r -a TARGETS <<<"${FUZZ_TARGETS:-${ALL_TARGETS[*]}}"
SANITIZER="${FUZZ_SANITIZER:-none}"
FUZZ_TARGET_DIR="${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/cargo-fuzz}"
FUZZ_TARGET_DIR="${FUZZ_TARGET_DIR:-$FUZZ_DIR/target}"
# The fuzz project pins libfuzzer-sys in fuzz/Cargo.lock; the spliced crate
# itself is built from this tree.
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

passed=0
failed=0
log() { echo "fuzz: $*" >&2; }

have_cargo_fuzz() { cargo fuzz --version >/dev/null 2>&1; }

# Why cargo-fuzz cannot be used, or nothing if it can.
cargo_fuzz_problem() {
    if [[ "${FUZZ_FALLBACK:-0}" == 1 ]]; then
        echo "FUZZ_FALLBACK=1"
        return
    fi
    if ! have_cargo_fuzz; then
        log "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
        if ! cargo install cargo-fuzz --locked >&2; then
            echo "cargo install cargo-fuzz failed"
            return
        fi
    fi
    if ! have_cargo_fuzz; then
        echo "cargo-fuzz is not on PATH after installing it"
        return
    fi
    log "building the targets (cargo fuzz build, sanitizer $SANITIZER, RUSTC_BOOTSTRAP=1)"
    if ! (cd "$FUZZ_DIR" && cargo fuzz build --sanitizer "$SANITIZER" --debug-assertions \
        --target-dir "$FUZZ_TARGET_DIR") >&2; then
        echo "cargo fuzz build failed"
    fi
}

run_cargo_fuzz() {
    local t="$1"
    mkdir -p "$FUZZ_DIR/corpus/$t" "$FUZZ_DIR/artifacts/$t"
    log "$t: seeds, corpus, then ${SECS}s of libFuzzer"
    # The first corpus directory receives new inputs; the seeds stay as they are.
    (cd "$FUZZ_DIR" && cargo fuzz run --sanitizer "$SANITIZER" --debug-assertions \
        --target-dir "$FUZZ_TARGET_DIR" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1) >&2
}

run_fallback() {
    local t="$1"
    log "$t: FALLBACK (not coverage-guided): ${SECS}s of random and mutated-seed inputs"
    (cd "$ROOT" && SPLICED_FUZZ_SECS="$SECS" SPLICED_FUZZ_TARGET="$t" \
        cargo test --release --lib fuzzing::tests::random_inputs -- --ignored --exact --nocapture) >&2
}

problem="$(cargo_fuzz_problem)"
if [[ -n "$problem" ]]; then
    log "cargo fuzz cannot run here ($problem)."
    log "FALLING BACK to scripts/fuzz.sh's non-guided loop: seeds as regression tests plus random inputs."
    if (cd "$ROOT" && cargo test --release --lib fuzzing::tests::seed_corpus_passes -- --exact) >&2; then
        log "seed corpus: ok"
    else
        log "seed corpus: FAILED"
        failed=$((failed + 1))
    fi
    runner=run_fallback
else
    runner=run_cargo_fuzz
fi

for t in "${TARGETS[@]}"; do
    start=$SECONDS
    if "$runner" "$t"; then
        log "$t: ok ($((SECONDS - start))s)"
        passed=$((passed + 1))
    else
        log "$t: FAILED ($((SECONDS - start))s); crash input under fuzz/artifacts/$t/ (cargo-fuzz) or in the output above"
        failed=$((failed + 1))
    fi
done

echo "fuzz: $passed passed, $failed failed"
[[ "$failed" -eq 0 ]]
