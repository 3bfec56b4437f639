#!/usr/bin/env bash
# Two mxgate binaries under the same load (mxgate-loadtest), alternating ROUNDS times,
# measured on mxgate's own CPU (µs per refused connection, or per message relayed), for a
# before/after of a change that compare.sh's ratios (±10 % between runs) cannot resolve.
#   deny:  the deny flood of bench.sh (127.66.0.0/16) against a 10,000-entry access list
#   relay: one ~2 KiB message a connection from 127.77.0.0/16, relayed to the harness's
#          own sink, which checks every message (with --pipeline: MAIL, RCPT and DATA in
#          one write)
# A run whose checks fail (a peer without the deny line, a message lost) says errors=some.
# With --b-load ARGS, side b's load gets ARGS too (one binary twice: e.g. --b-load --bdat
# measures CHUNKING against DATA); --body-size sets the relay's message size; each run
# also prints mxgate's peak resident memory (VmHWM).
#
# usage: loadtest/bin-ab.sh BIN_A BIN_B [--mode deny|relay] [--io uring|epoll] [--rounds N] [--pipeline]
#          [--b-load ARGS] [--body-size BYTES]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
port=${PORT:-2712} sink=${SINK_PORT:-31035}
a=$1 b=$2; shift 2
mode=deny io=uring rounds=6 pipe= bload= body=2048
while [ $# -gt 0 ]; do
  case $1 in
    --mode) mode=$2; shift 2 ;;
    --io) io=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --pipeline) pipe=--pipeline; shift ;;
    --b-load) bload=$2; shift 2 ;;
    --body-size) body=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
(cd "$root" && cargo build --release -q -p mxgate-loadtest --bin genlist --bin mxgate-loadtest)
lt=$root/target/release/mxgate-loadtest
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
"$root/target/release/genlist" 10000 > "$d/base.list"
{ cat "$d/base.list"; echo "deny 127.66.0.0/16"; } > "$d/access.list"
printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[access]\nlist = "access.list"\n[relay]\ndomains = ["bench.test"]\nnext_hops = ["127.0.0.1:%s"]\n' \
  "$port" "$sink" > "$d/mxgate.toml"
if [ "$mode" = relay ]; then
  load=(relay --sink "127.0.0.1:$sink" --domain bench.test --sources 127.77.0.0/16 $pipe --concurrency 32 --body-size "$body")
else
  load=(deny-storm --sources 127.66.0.0/16 --concurrency 64)
fi
for _ in $(seq "$rounds"); do
  for v in a b; do
    exe=$a; [ "$v" = b ] && exe=$b
    MXGATE_LOG=warn "$exe" --config "$d/mxgate.toml" --io "$io" & pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    sleep 0.5
    t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
    extra=(); [ "$v" = b ] && [ -n "$bload" ] && read -ra extra <<< "$bload"
    "$lt" "${load[@]}" "${extra[@]}" --target "127.0.0.1:$port" --duration 5s --threads 2 --json "$d/run.json" >/dev/null 2>&1 \
      && errors=0 || errors=some
    t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
    rss=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    n=$(sed -n 's/.*"ops": \([0-9]*\).*/\1/p' "$d/run.json" | head -1)
    awk -v v="$v" -v t=$((t1 - t0)) -v n="$n" -v e="${errors:-?}" -v hz="$(getconf CLK_TCK)" -v rss="$rss" \
      'BEGIN{printf "%s us_per_op=%.2f ops=%d errors=%s peak_rss_kib=%s\n", v, t * 1e6 / hz / n, n, e, rss}'
  done
done | awk '{print} {split($2, x, "="); s[$1] += x[2]; c[$1]++}
  END {printf "mean a=%.2f b=%.2f ratio_b_over_a=%.3f\n", s["a"]/c["a"], s["b"]/c["b"], (s["b"]/c["b"])/(s["a"]/c["a"])}'
