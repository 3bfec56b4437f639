#!/usr/bin/env bash
# Reloads under load: mxgate-loadtest's relay scenario (its own sink as the next hop: every
# message that got 250 must arrive byte-exact, once) against an mxgate whose access list of
# ENTRIES random prefixes is replaced (by rename) by another one while mxgate is sent
# SIGHUP every EVERY seconds (R), alternating with the same run without reloads (Q),
# ROUNDS times. Each run: its verdict, messages/s and mxgate's CPU per message; then the
# mean ratio R/Q of both and how many reloads mxgate logged as done and as refused (none
# should be).
#
# usage: loadtest/reload-bench.sh [--io uring|epoll] [--entries N] [--every SECONDS] [--rounds N] [--seconds S]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
io=uring entries=10000 every=0.05 rounds=2 seconds=8
while [ $# -gt 0 ]; do
  case $1 in
    --io) io=$2; shift 2 ;;
    --entries) entries=$2; shift 2 ;;
    --every) every=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
port=${PORT:-2600} sink_port=${SINK_PORT:-31035}
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate &&
  cargo build --release -q -p mxgate-loadtest --bin genlist --bin mxgate-loadtest)
mx=$root/target/release
work=$(mktemp -d)
server= swapper=
trap 'kill $server $swapper 2>/dev/null || true; rm -rf "$work"' EXIT
"$mx/genlist" "$entries" 1 > "$work/a.list"
"$mx/genlist" "$entries" 2 > "$work/b.list"
printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[access]\nlist = "access.list"\n[relay]\ndomains = ["bench.test"]\nnext_hops = ["127.0.0.1:%s"]\n' \
  "$port" "$sink_port" > "$work/mxgate.toml"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# swap: replaces the list and signals mxgate every $every seconds until killed
swap() {
  local n=0 src
  while kill -0 "$server" 2>/dev/null; do
    n=$((n + 1))
    if [ $((n % 2)) = 1 ]; then src=b; else src=a; fi
    cp "$work/$src.list" "$work/next.list" && mv "$work/next.list" "$work/access.list"
    kill -HUP "$server" 2>/dev/null || break
    sleep "$every"
  done
}

for _ in $(seq "$rounds"); do
  for v in Q R; do
    cp "$work/a.list" "$work/access.list"
    : > "$work/mxgate.log"
    "$mx/mxgate" --config "$work/mxgate.toml" --io "$io" 2> "$work/mxgate.log" & server=$!
    for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    sleep 0.3
    [ "$v" = R ] && { swap & swapper=$!; }
    c0=$(cpu "$server")
    ok=pass
    "$mx/mxgate-loadtest" relay --target "127.0.0.1:$port" --sink "127.0.0.1:$sink_port" --domain bench.test \
      --sources 127.77.0.0/16 --duration "${seconds}s" --concurrency 32 --threads 2 --json "$work/run.json" \
      > "$work/out" 2>&1 || { ok=FAIL; cat "$work/out" >&2; }
    c1=$(cpu "$server")
    [ "$v" = R ] && { kill "$swapper" 2>/dev/null; wait "$swapper" 2>/dev/null || true; }
    kill "$server"; wait "$server" 2>/dev/null || true
    ops=$(sed -n 's/.*"ops": \([0-9]*\).*/\1/p' "$work/run.json" | head -1)
    rate=$(sed -n 's/.*"throughput": \([0-9.]*\).*/\1/p' "$work/run.json" | head -1)
    done_=$(grep -c 'SIGHUP: reloaded' "$work/mxgate.log" || true)
    refused=$(grep -c 'reload refused' "$work/mxgate.log" || true)
    awk -v v="$v" -v ok="$ok" -v r="$rate" -v n="$ops" -v c=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" \
      -v d="$done_" -v f="$refused" \
      'BEGIN { printf "%s %s messages=%d rate=%.1f cpu_us_per_message=%.2f reloads_done=%d refused=%d\n",
               v, ok, n, r, c * 1e6 / hz / n, d, f }'
  done
done | awk '{ print }
  { for (i = 3; i <= NF; i++) { split($i, kv, "="); x[$1, kv[1]] += kv[2] } c[$1]++ }
  $2 != "pass" { bad++ }
  END {
    printf "reloading / quiet: rate %.3f, cpu per message %.3f; reloads done %d, refused %d\n",
      (x["R", "rate"] / c["R"]) / (x["Q", "rate"] / c["Q"]),
      (x["R", "cpu_us_per_message"] / c["R"]) / (x["Q", "cpu_us_per_message"] / c["Q"]),
      x["R", "reloads_done"], x["R", "refused"]
    if (bad) { printf "%d run(s) failed their checks\n", bad; exit 1 }
  }'
