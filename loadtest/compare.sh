#!/usr/bin/env bash
# mxgate against the cheapest possible C servers for the same job, with mxgate-loadtest as
# the client of both: the limits yardstick supplies only the baseline servers (and the
# relay's next hop). Baseline and mxgate alternate REPEAT times; each run's rate and
# server CPU per operation (from /proc: the server's, plus the C sink's for a relay), then
# the ratios of the medians, mxgate over each baseline.
#   deny:  limit_deny and limit_deny_uring vs mxgate; peers from 127.66.0.0/16 must each
#          get the deny line first (the harness checks every one).
#   relay: limit_accept taking the messages itself vs mxgate relaying them to a second
#          limit_accept; the sink's count must grow by exactly the messages accepted.
#
# usage: loadtest/compare.sh deny|relay --config FILE [--io uring|epoll] [--repeat N]
#                            [--seconds S] [--conc N] [--pipeline]
# FILE: mxgate's configuration; it must listen on 127.0.0.1:$PORT (default 2600) and, for
# relay, relay `bench.test` to 127.0.0.1:$SINK_PORT (default 31025).
# LIMITS_DIR: the limits yardstick (default ../shared/limits beside this repository).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
limits=${LIMITS_DIR:-$root/../shared/limits}
bin=${LIMITS_BIN:-/tmp/mxgate-limits/bin}
port=${PORT:-2600} base_port=${BASE_PORT:-31026} sink_port=${SINK_PORT:-31025}
mode=$1; shift
config= io=uring repeat=2 seconds=8 conc= pipe=
while [ $# -gt 0 ]; do
  case $1 in
    --config) config=$2; shift 2 ;;
    --io) io=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --conc) conc=$2; shift 2 ;;
    --pipeline) pipe=--pipeline; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case $mode in deny) conc=${conc:-64} ;; relay) conc=${conc:-32} ;; *) echo "mode: deny or relay" >&2; exit 2 ;; esac
[ -n "$config" ] || { echo "--config FILE is required" >&2; exit 2; }
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p mxgate-loadtest --bin mxgate-loadtest)
[ -x "$bin/limit_accept" ] || make -s -C "$limits" BIN="$bin" >/dev/null
lt=$root/target/release/mxgate-loadtest
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; } # jiffies of user + system time
listening() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
xcount() { # messages taken so far by the limit_accept on 127.0.0.1:PORT
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1"
    IFS= read -r -t 5 line <&3
    printf 'XCOUNT\r\n' >&3
    IFS= read -r -t 5 line <&3
    printf 'QUIT\r\n' >&3
    line=${line%$'\r'}
    echo "${line#250 }"
  )
}

sink_pid=
if [ "$mode" = relay ]; then
  "$bin/limit_accept" "$sink_port" 2 86400 >/dev/null 2>&1 & sink_pid=$!; pids+=("$sink_pid")
  listening "$sink_port" || { echo "the sink does not listen" >&2; exit 2; }
fi

# run TARGET PORT START...: starts the server, loads it, stops it; one result row
run() {
  local target=$1 p=$2; shift 2
  "$@" >/dev/null 2>&1 & local pid=$!
  pids+=("$pid")
  listening "$p" || { echo "$target does not listen on $p" >&2; exit 2; }
  sleep 0.3
  local count_port=$p
  [ "$target" = mxgate ] && count_port=$sink_port
  local n0=0 s0=0
  if [ "$mode" = relay ]; then n0=$(xcount "$count_port"); s0=$(cpu "$sink_pid"); fi
  local c0; c0=$(cpu "$pid")
  local load=(deny-storm --sources 127.66.0.0/16)
  [ "$mode" = relay ] && load=(relay --unchecked --domain bench.test --sources 127.77.0.0/16 $pipe)
  "$lt" "${load[@]}" --target "127.0.0.1:$p" --duration "${seconds}s" --concurrency "$conc" --threads 2 \
    --json "$work/run.json" >"$work/out.txt" 2>&1 && ok=yes || ok=no
  local c1; c1=$(cpu "$pid")
  local sink_cpu=0
  if [ "$mode" = relay ]; then
    local n1; n1=$(xcount "$count_port")
    [ "$target" = mxgate ] && sink_cpu=$(( $(cpu "$sink_pid") - s0 ))
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local ops rate
  ops=$(sed -n 's/.*"ops": \([0-9]*\).*/\1/p' "$work/run.json" | head -1)
  rate=$(sed -n 's/.*"throughput": \([0-9.]*\).*/\1/p' "$work/run.json" | head -1)
  if [ "$mode" = relay ] && [ "$((n1 - n0))" != "$ops" ]; then
    ok=no; echo "$target: the next hop took $((n1 - n0)) messages, the client saw $ops accepted" >&2
  fi
  [ "$ok" = yes ] || { echo "$target: run not verified:" >&2; cat "$work/out.txt" >&2; }
  awk -v t="$target" -v r="$rate" -v c="$(( c1 - c0 + sink_cpu ))" -v n="$ops" -v ok="$ok" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%s\t%.1f\t%.2f\t%s\n", t, r, (n > 0 ? c * 1e6 / hz / n : 0), ok }'
}

rows=$work/rows.tsv
for rep in $(seq "$repeat"); do
  if [ "$mode" = deny ]; then
    run limit_deny "$base_port" "$bin/limit_deny" "$base_port" 2 86400
    [ -x "$bin/limit_deny_uring" ] && run limit_deny_uring "$base_port" "$bin/limit_deny_uring" "$base_port" 2 86400
  else
    run limit_accept "$base_port" "$bin/limit_accept" "$base_port" 2 86400
  fi
  run mxgate "$port" "$root/target/release/mxgate" --config "$config" --io "$io"
done | tee "$rows" | awk -F'\t' '{ printf "run %-17s rate/s=%9.1f server_cpu_us_per_op=%7.2f verified=%s\n", $1, $2, $3, $4 }'
awk -F'\t' '
  function median(v, n,   i, j, t) {
    for (i = 2; i <= n; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  $4 == "yes" { n[$1]++; rate[$1, n[$1]] = $2; cpu[$1, n[$1]] = $3 } $4 != "yes" { bad++ }
  function med(a, t,   k, v) { for (k = 1; k <= n[t]; k++) v[k] = a[t, k]; return median(v, n[t]) }
  END {
    for (t in n) if (t != "mxgate" && n["mxgate"] > 0)
      printf "ratio rate=%.2f cpu_per_op=%.2f baseline=%s\n", med(rate, "mxgate") / med(rate, t), med(cpu, "mxgate") / med(cpu, t), t
    if (bad) { printf "%d run(s) not verified\n", bad; exit 1 }
  }' "$rows"
