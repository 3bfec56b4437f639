#!/usr/bin/env bash
# A fuzzing campaign (optimized, with debug assertions on, as the corpus replay on stable
# has them): every target for SECONDS or RUNS executions, whichever ends first
# (defaults 1800 s and 10,000,000), JOBS at once; prints each target's executions and
# whether it crashed (a crash leaves its input in fuzz/artifacts/TARGET/). With KEEP=1
# the inputs that reached new code are merged into fuzz/corpus/TARGET, which
# tests/fuzz_corpus.rs replays on stable.
#
# usage: fuzz/campaign.sh [SECONDS] [RUNS] [JOBS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q '^nightly' || { echo "cargo-fuzz needs a nightly toolchain (rustup toolchain install nightly)" >&2; exit 2; }
secs=${1:-1800} runs=${2:-10000000} jobs=${3:-2}
shift $(( $# < 3 ? $# : 3 ))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(session dns config upstream proxy control fleet netlink)
cargo +nightly fuzz build -O -a
out=$(mktemp -d)
run() {
  local t=$1 started rc
  mkdir -p "$out/$t"
  started=$(date +%s)
  rc=0
  cargo +nightly fuzz run -O -a "$t" "$out/$t" "corpus/$t" -- -max_total_time="$secs" -runs="$runs" \
    -print_final_stats=1 > "$out/$t.log" 2>&1 || rc=$?
  printf '%s exit=%s seconds=%s executions=%s new_inputs=%s\n' "$t" "$rc" $(( $(date +%s) - started )) \
    "$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$t.log")" "$(ls "$out/$t" | wc -l)"
  if [ "$rc" != 0 ]; then grep -E 'panicked|ERROR|SUMMARY' "$out/$t.log" | head -5; fi
  if [ "${KEEP:-0}" = 1 ]; then
    cargo +nightly fuzz run -O -a "$t" "corpus/$t" "$out/$t" -- -merge=1 > "$out/$t.merge" 2>&1 || true
  fi
}
export -f run
export out secs runs
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run {}'
