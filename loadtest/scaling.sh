#!/usr/bin/env bash
# Multi-core scaling of the deny path: mxgate (uring, epoll) and the C baselines
# (limit_deny, limit_deny_uring) at 1, 2, 4 and 8 server threads, one after another in
# one run. The server is pinned to the first half of the cores, the load client
# (mxgate-loadtest deny-storm, as many threads as the other half has cores) to the other.
#
# usage: loadtest/scaling.sh BIN_DIR LIST [SECONDS]
#   BIN_DIR holds mxgate, mxgate-loadtest, limit_deny and (optional) limit_deny_uring;
#   LIST is the access list (e.g. `genlist 10000`); `deny 127.66.0.0/16` is added.
# Prints one line per run: server threads rate/s server_cpu_us_per_op p50_ms p99_ms errors.
set -euo pipefail
bin=$1 list=$2 secs=${3:-5}
ncpu=$(nproc)
half=$((ncpu / 2))
server_cpus="0-$((half - 1))" client_cpus="$half-$((ncpu - 1))"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
{ cat "$list"; echo "deny 127.66.0.0/16"; } > "$work/access.list"
ulimit -n 65536 2>/dev/null || true
port=2600
hz=$(getconf CLK_TCK)

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

run() { # run NAME THREADS CMD...
  local name=$1 threads=$2 pid out t0 t1 i
  shift 2
  port=$((port + 1))
  taskset -c "$server_cpus" "$@" > "$work/server.log" 2>&1 &
  pid=$!
  for i in $(seq 1 100); do listening "$port" && break; sleep 0.1; done
  if ! listening "$port"; then echo "$name $threads: did not start: $(tail -n 3 "$work/server.log")"; kill "$pid" 2>/dev/null; return; fi
  t0=$(cpu_ticks "$pid")
  taskset -c "$client_cpus" "$bin/mxgate-loadtest" deny-storm --target "127.0.0.1:$port" --duration "${secs}s" \
    --concurrency 512 --threads "$half" --json "$work/run.json" > "$work/client.log" 2>&1 && verdict=pass || verdict=FAIL
  t1=$(cpu_ticks "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  get() { sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p" "$work/run.json" | head -1; }
  awk -v n="$name" -v t="$threads" -v r="$(get throughput)" -v ok="$(get ops)" -v c=$((t1 - t0)) -v hz="$hz" \
      -v p50="$(get p50)" -v p99="$(get p99)" -v v="$verdict" \
    'BEGIN { printf "%-18s %2d %9.0f %8.1f %7.2f %7.2f %s\n", n, t, r, (ok > 0 ? c / hz * 1e6 / ok : 0), p50, p99, v }'
  grep -m1 "listening" "$work/server.log" | sed 's/^/    /' || true
}

echo "# $(uname -r), $ncpu cores; server on cpus $server_cpus, client on $client_cpus; ${secs}s per run"
echo "# server threads rate/s server_cpu_us_per_op p50_ms p99_ms verdict (every peer denied first)"
for threads in 1 2 4 8; do
  run limit_deny "$threads" "$bin/limit_deny" $((port + 1)) "$threads" 120
  [ -x "$bin/limit_deny_uring" ] && run limit_deny_uring "$threads" "$bin/limit_deny_uring" $((port + 1)) "$threads" 120
  for io in uring epoll; do
    printf '[listen]\naddresses = ["127.0.0.1:%s"]\nthreads = %s\n[access]\nlist = "access.list"\n' $((port + 1)) "$threads" > "$work/m.toml"
    run "mxgate-$io" "$threads" "$bin/mxgate" --config "$work/m.toml" --io "$io"
  done
done
