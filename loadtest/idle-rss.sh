#!/usr/bin/env bash
# Resident memory of an idle mxgate with a large access list loaded.
# usage: loadtest/idle-rss.sh [ENTRIES] (default 1000000); builds release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
cargo build --release -q --bin mxgate -p mxgate
cargo build --release -q --bin genlist -p mxgate-loadtest
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
target/release/genlist "$n" > "$dir/access.list"
printf '[listen]\naddresses = ["127.0.0.1:0"]\n[access]\nlist = "access.list"\n' > "$dir/mxgate.toml"

target/release/mxgate --config "$dir/mxgate.toml" check
baseline_dir=$(mktemp -d)
printf '[listen]\naddresses = ["127.0.0.1:0"]\n' > "$baseline_dir/mxgate.toml"

rss_of() { # rss_of CONFIG: start mxgate, wait for it to listen, print its VmRSS and VmHWM (KiB) and start time
  local log="$dir/log" t0 t1
  t0=$(date +%s%N)
  target/release/mxgate --config "$1" 2> "$log" &
  pid=$!
  for _ in $(seq 1 600); do grep -q "mxgate listening" "$log" && break; sleep 0.1; done
  grep -q "mxgate listening" "$log" || { cat "$log"; exit 1; }
  t1=$(date +%s%N)
  sleep 1 # idle
  awk -v ms=$(( (t1 - t0) / 1000000 )) '/^VmRSS/ { rss = $2 } /^VmHWM/ { hwm = $2 } END { printf "rss_kib=%d peak_kib=%d start_ms=%d\n", rss, hwm, ms }' "/proc/$pid/status"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
echo "without a list:  $(rss_of "$baseline_dir/mxgate.toml")"
echo "with $n entries: $(rss_of "$dir/mxgate.toml")"
rm -rf "$baseline_dir"
