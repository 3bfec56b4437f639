#!/usr/bin/env bash
# Memory under big messages: SESSIONS concurrent sessions each relaying one SIZE_MIB
# message through mxgate to the C sink (shared/limits limit_accept); prints mxgate's
# peak resident memory, and checks the sink counted every message.
#
# usage: loadtest/big-messages.sh [SESSIONS] [SIZE_MIB] [--io uring|epoll]   (default 1000 10)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
limits=${LIMITS_DIR:-$root/../shared/limits}
bin=${LIMITS_BIN:-/tmp/mxgate-limits/bin}
sessions=${1:-1000} size=${2:-10} io=uring
[ "${3:-}" = --io ] && io=$4
make -s -C "$limits" LIMITS_BIN="$bin" core >&2
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p mxgate-loadtest --bin bigmsg)
work=$(mktemp -d)
sink_port=31045 port=2610
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
"$bin/limit_accept" "$sink_port" 2 3600 2> "$work/sink.log" &
printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[relay]\ndomains = ["bench.test"]\nnext_hops = ["127.0.0.1:%s"]\n' \
  "$port" "$sink_port" > "$work/mxgate.toml"
"$root/target/release/mxgate" --config "$work/mxgate.toml" --io "$io" 2> "$work/mxgate.log" &
pid=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
echo "idle: $(grep VmRSS /proc/$pid/status)"
"$root/target/release/bigmsg" "$port" "$sessions" "$size" "$pid"
count=$( (exec 3<>"/dev/tcp/127.0.0.1/$sink_port"; read -r _ <&3; printf 'XCOUNT\r\n' >&3; read -r line <&3; echo "${line#250 }" | tr -d '\r') )
echo "sink_count=$count"
