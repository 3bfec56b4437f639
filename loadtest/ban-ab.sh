#!/usr/bin/env bash
# What 100,000 bans cost the gate, measured on mxgate's own CPU: the same deny flood
# (mxgate-loadtest deny-storm, 64 at once from 127.66.0.0/16, each peer checked for the
# deny line) refused by the access list (A) or by bans from a ban file of 100,000 (B),
# the two alternating ROUNDS times; µs of CPU per refused connection for each, and their
# mean ratio B/A.
#
# usage: loadtest/ban-ab.sh [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/loadtest/common.sh"
port=${PORT:-2711}
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p mxgate-loadtest --bin genlist --bin genbans --bin mxgate-loadtest)
mx=$root/target/release
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
"$mx/genlist" 10000 > "$d/base.list"
{ cat "$d/base.list"; echo "deny 127.66.0.0/16"; } > "$d/a.list"
printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[access]\nlist = "a.list"\n' "$port" > "$d/a.toml"
printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[access]\nlist = "base.list"\n[abuse]\nban_file = "bans.list"\n' "$port" > "$d/b.toml"
"$mx/genbans" 100000 127.66.0.0/16 > "$d/bans.list"
for _ in $(seq "${1:-8}"); do
  for v in a b; do
    MXGATE_LOG=warn "$mx/mxgate" --config "$d/$v.toml" --io uring & pid=$!
    wait_port "$port"
    t0=$(ticks "$pid")
    "$mx/mxgate-loadtest" deny-storm --target "127.0.0.1:$port" --sources 127.66.0.0/16 --expect 530 \
      --duration 4s --concurrency 64 --threads 2 --json "$d/run.json" > "$d/out" 2>&1 ||
      { echo "run $v failed:" >&2; cat "$d/out" >&2; exit 1; }
    t1=$(ticks "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    n=$(ops "$d/run.json")
    per_op "$v" $((t1 - t0)) "$n" us_per_refusal
  done
done | awk '{print} {split($2, x, "="); s[$1] += x[2]; c[$1]++}
  END {printf "mean a=%.2f b=%.2f ratio=%.3f\n", s["a"]/c["a"], s["b"]/c["b"], (s["b"]/c["b"])/(s["a"]/c["a"])}'
