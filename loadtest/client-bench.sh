#!/usr/bin/env bash
# Is the harness ever the bottleneck? mxgate-loadtest and the limits yardstick's C client
# (smtpload) load the same C server (limit_deny for deny, limit_accept for relay) in turn,
# REPEAT times, with the same threads, concurrency and source range; each run's rate (as
# the client reports it) and the client's CPU per connection or message (user + system,
# from bash's `times` of the client alone). Prints each run, then harness over smtpload:
# the ratios of the medians, and the geometric means of each round's ratios (the two runs
# of a round are back to back, first one client then the other, the order alternating).
# Targets: rate >= 1.0, cpu_per_op <= 1.1.
#
# usage: loadtest/client-bench.sh deny|relay [--repeat N] [--seconds S] [--conc N] [--threads N] [--pipeline]
# LIMITS_DIR: the limits yardstick (default ../shared/limits beside this repository).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
limits=${LIMITS_DIR:-$root/../shared/limits}
bin=${LIMITS_BIN:-/tmp/mxgate-limits/bin}
port=${PORT:-2700}
mode=${1:-}; shift || true
repeat=5 seconds=5 conc= threads=2 pipe=
while [ $# -gt 0 ]; do
  case $1 in
    --repeat) repeat=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --conc) conc=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --pipeline) pipe=yes; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case $mode in deny) conc=${conc:-64} ;; relay) conc=${conc:-32} ;; *) echo "mode: deny or relay" >&2; exit 2 ;; esac
(cd "$root" && cargo build --release -q -p mxgate-loadtest --bin mxgate-loadtest)
[ -x "$bin/smtpload" ] || make -s -C "$limits" BIN="$bin" >/dev/null
lt=$root/target/release/mxgate-loadtest
work=$(mktemp -d)
server=
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
if [ "$mode" = deny ]; then
  "$bin/limit_deny" "$port" 2 86400 >/dev/null 2>&1 & server=$!
else
  "$bin/limit_accept" "$port" 2 86400 >/dev/null 2>&1 & server=$!
fi
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done

# client NAME COMMAND...: one run; prints "NAME rate cpu_us_per_op"
client() {
  local name=$1; shift
  local ops rate
  # the children's CPU (this subshell runs only the client), before and after
  ( "$@" > "$work/out" 2>&1 || true; times > "$work/times" )
  if [ "$name" = smtpload ]; then
    ops=$(sed -n 's/^ok_total=//p' "$work/out")
    rate=$(sed -n 's/^rate=//p' "$work/out")
  else
    ops=$(sed -n 's/.*"ops": \([0-9]*\).*/\1/p' "$work/run.json" | head -1)
    rate=$(sed -n 's/.*"throughput": \([0-9.]*\).*/\1/p' "$work/run.json" | head -1)
    grep -q '"verdict": "pass"' "$work/run.json" || { echo "harness run failed:" >&2; cat "$work/out" >&2; exit 1; }
  fi
  # `times`' second line: the children's user and system time, as 0m1.234s
  awk -v name="$name" -v rate="$rate" -v ops="$ops" 'NR == 2 {
      cpu = 0
      for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); cpu += t[1] * 60 + t[2] }
      printf "%s\t%.1f\t%.2f\n", name, rate, (ops > 0 ? cpu * 1e6 / ops : 0)
    }' "$work/times"
}

rows=$work/rows.tsv
smtpload_run() {
  if [ "$mode" = deny ]; then
    client smtpload "$bin/smtpload" -m deny -s 127.66.0.0/16 -e 530 -p "$port" -d "$seconds" -w 0 \
      -c "$conc" -t "$threads"
  else
    client smtpload "$bin/smtpload" -m relay -s 127.77.0.0/16 -p "$port" -d "$seconds" -w 0 \
      -c "$conc" -t "$threads" -r user@bench.test ${pipe:+-P}
  fi
}
harness_run() {
  if [ "$mode" = deny ]; then
    client harness "$lt" deny-storm --target "127.0.0.1:$port" --sources 127.66.0.0/16 --expect 530 \
      --duration "${seconds}s" --concurrency "$conc" --threads "$threads" --json "$work/run.json"
  else
    client harness "$lt" relay --unchecked --domain bench.test --target "127.0.0.1:$port" \
      --sources 127.77.0.0/16 --duration "${seconds}s" --concurrency "$conc" --threads "$threads" \
      ${pipe:+--pipeline} --json "$work/run.json"
  fi
}
# rounds alternate which client goes first; a round's two runs share the machine's
# moment (its speed drifts by tens of percent here), so each round gives a ratio too
for round in $(seq "$repeat"); do
  if [ $((round % 2)) = 1 ]; then smtpload_run; harness_run; else harness_run; smtpload_run; fi |
    sed "s/^/$round\t/"
done | tee "$rows" | awk -F'\t' '{ printf "run %-9s rate/s=%9.1f client_cpu_us_per_op=%6.2f\n", $2, $3, $4 }'
awk -F'\t' '
  function median(v, n,   i, j, t) {
    for (i = 2; i <= n; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  { n[$2]++; rate[$2, n[$2]] = $3; cpu[$2, n[$2]] = $4; r[$1, $2] = $3; c[$1, $2] = $4; last = $1 }
  function med(a, t,   k, v) { for (k = 1; k <= n[t]; k++) v[k] = a[t, k]; return median(v, n[t]) }
  END {
    for (k = 1; k <= last; k++) { lr += log(r[k, "harness"] / r[k, "smtpload"]); lc += log(c[k, "harness"] / c[k, "smtpload"]) }
    printf "ratio rate=%.2f cpu_per_op=%.2f (harness / smtpload, medians of %d runs each)\n",
      med(rate, "harness") / med(rate, "smtpload"), med(cpu, "harness") / med(cpu, "smtpload"), n["harness"]
    printf "round by round: rate=%.2f cpu_per_op=%.2f (geometric means of the %d rounds\x27 ratios)\n",
      exp(lr / last), exp(lc / last), last
  }' "$rows"
