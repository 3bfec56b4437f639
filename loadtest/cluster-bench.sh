#!/usr/bin/env bash
# The fleet ([cluster]) measured against a real redis-server on loopback (no persistence):
#  1. ban propagation: from the failing reply on node A to node B refusing the address
#     (banlatency, failure_threshold = 1), quiet and then under a deny flood on both
#     nodes (mxgate-loadtest deny-storm, 32 at once on each, 127.66.0.0/16 denied);
#  2. the deny path: mxgate's CPU per denied connection and denials/s with [cluster] off,
#     on (Redis up, a second node connected) and down (Redis unreachable: nothing listens
#     on its port, the node retrying), alternating ROUNDS times; prints on/off, down/off;
#  3. a distributed dictionary attack: 1,000 addresses, each failing 3 times on each of
#     three nodes (failure_threshold = 9: no node reaches it alone), then 10 times
#     (threshold 30, the default): time from an
#     address's last failure until the whole fleet refuses it, and Redis commands per
#     failure (what redis-server counted over the attack: INFO commandstats).
#
# usage: loadtest/cluster-bench.sh [ROUNDS] [--io uring|epoll]   (PARTS=13: only parts 1 and 3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/loadtest/common.sh"
rounds=${1:-4} io=uring parts=${PARTS:-123}
[ "${2:-}" = --io ] && io=$3
redis_port=${REDIS_PORT:-31040}
pa=${PORT:-2720} pb=$((pa + 1)) pc=$((pa + 2))
command -v redis-server >/dev/null || { echo "redis-server is needed (apt-get install redis-server)" >&2; exit 2; }
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate &&
  cargo build --release -q -p mxgate-loadtest --bin mxgate-loadtest --bin banlatency --bin fleetattack)
bin=$root/target/release
d=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$d"; }
trap cleanup EXIT
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$d" --loglevel warning \
  > /dev/null & pids+=($!)
for _ in $(seq 100); do redis-cli -p "$redis_port" ping > /dev/null 2>&1 && break; sleep 0.05; done
echo "deny 127.66.0.0/16" > "$d/access.list"

# node NAME PORT THRESHOLD [cluster: yes|no]: writes NAME.toml
node() {
  printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[access]\nlist = "access.list"\n[abuse]\nfailure_threshold = %s\nescalate_after = 0\n' \
    "$2" "$3" > "$d/$1.toml"
  if [ "${4:-yes}" = yes ]; then
    printf '[cluster]\nredis = "redis://127.0.0.1:%s/0"\nnode = "%s"\n' "$redis_port" "$1" >> "$d/$1.toml"
  fi
}
start() { MXGATE_LOG=warn "$bin/mxgate" --config "$d/$1.toml" --io "$io" & pids+=($!); wait_port "$2"; }
flood() { # PORT SECONDS
  "$bin/mxgate-loadtest" deny-storm --target "127.0.0.1:$1" --sources 127.66.0.0/16 --duration "$2" \
    --concurrency 32 --threads 1 --json "$d/flood-$1.json" > "$d/flood-$1.out" 2>&1 || true
}

if [[ $parts == *1* ]]; then
echo "== 1. ban propagation, A's failing reply -> B refuses (us) =="
node a "$pa" 1; node b "$pb" 1
start a "$pa"; start b "$pb"
echo "quiet: $("$bin/banlatency" "$pa" 500 0 "$pb")"
flood "$pa" 14 & f1=$!
flood "$pb" 14 & f2=$!
sleep 2
echo "flood: $("$bin/banlatency" "$pa" 500 500 "$pb")"
wait "$f1" "$f2"
for f in "$d"/flood-*.out; do echo "flood on ${f##*-}: $(grep -E '^(phase|main) ' "$f" | tr -s ' ' | tr '\n' ' ')"; done
kill "${pids[@]:1}"; wait "${pids[@]:1}" 2>/dev/null || true; pids=("${pids[0]}")
redis-cli -p "$redis_port" flushall > /dev/null
fi

if [[ $parts == *2* ]]; then
echo "== 2. deny path: mxgate CPU per denied connection, [cluster] off / on =="
node off "$pa" 30 no; node on "$pa" 30; node peer "$pb" 30
sed "s/127.0.0.1:$redis_port/127.0.0.1:$((redis_port + 1))/" "$d/on.toml" > "$d/down.toml"
start peer "$pb"
for _ in $(seq "$rounds"); do
  for v in off on down; do
    MXGATE_LOG=warn "$bin/mxgate" --config "$d/$v.toml" --io "$io" & pid=$!
    wait_port "$pa"
    t0=$(ticks "$pid")
    "$bin/mxgate-loadtest" deny-storm --target "127.0.0.1:$pa" --sources 127.66.0.0/16 --duration 5s \
      --concurrency 64 --threads 2 --json "$d/run.json" > "$d/out" 2>&1 || { cat "$d/out" >&2; exit 1; }
    t1=$(ticks "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    n=$(ops "$d/run.json")
    echo "$(per_op "$v" $((t1 - t0)) "$n" us_per_denial) denials_per_s=$((n / 5))"
  done
done | awk '{print} {split($2, x, "="); s[$1] += x[2]; c[$1]++}
  {split($3, y, "="); r[$1] += y[2]}
  END {a = s["off"]/c["off"]; b = s["on"]/c["on"]; dn = s["down"]/c["down"];
       printf "mean us_per_denial off=%.2f on=%.2f down=%.2f on/off=%.3f down/off=%.3f\n", a, b, dn, b/a, dn/a;
       printf "mean denials_per_s off=%d on=%d down=%d\n", r["off"]/c["off"], r["on"]/c["on"], r["down"]/c["down"]}'
kill "${pids[@]:1}"; wait "${pids[@]:1}" 2>/dev/null || true; pids=("${pids[0]}")
redis-cli -p "$redis_port" flushall > /dev/null
fi

if [[ $parts == *3* ]]; then
# attack FAILURES: each address fails FAILURES times on each node (threshold 3 x that)
attack() {
  echo "== 3. distributed dictionary attack: 1,000 addresses x 3 nodes x $1 failures (threshold $(($1 * 3))) =="
  node a "$pa" $(($1 * 3)); node b "$pb" $(($1 * 3)); node c "$pc" $(($1 * 3))
  start a "$pa"; start b "$pb"; start c "$pc"
  redis-cli -p "$redis_port" config resetstat > /dev/null
  out=$("$bin/fleetattack" "$pa,$pb,$pc" 1000 "$1" 64)
  sleep 0.5 # the last flushes
  echo "$out"
  stats=$(redis-cli -p "$redis_port" info commandstats | tr -d '\r')
  # commands by name (the CONFIG RESETSTAT and INFO asked here left out)
  echo "$stats" | sed -n 's/^cmdstat_\([a-z]*\):calls=\([0-9]*\).*/\1=\2/p' | grep -Ev '^(info|config)=' | tr '\n' ' '; echo
  commands=$(echo "$stats" | sed -n 's/^cmdstat_\([a-z]*\):calls=\([0-9]*\).*/\1 \2/p' |
    awk '$1 != "info" && $1 != "config" {s += $2} END {print s}')
  failures=$(echo "$out" | sed -n 's/.*failures=\([0-9]*\).*/\1/p')
  awk -v c="$commands" -v f="$failures" 'BEGIN {printf "redis_commands=%d failures=%d commands_per_failure=%.3f\n", c, f, c / f}'
  kill "${pids[@]:1}"; wait "${pids[@]:1}" 2>/dev/null || true; pids=("${pids[0]}")
  redis-cli -p "$redis_port" flushall > /dev/null
}
attack 3
attack 10
fi
