#!/usr/bin/env bash
# Time from the failure that promotes an address to its first refused connection, with
# and without a deny flood (mxgate-loadtest deny-storm, 64 at once from 127.66.0.0/16,
# all denied) running.
#
# usage: loadtest/ban-latency.sh [--io uring|epoll] [SOURCES]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
io=uring
if [ "${1:-}" = --io ]; then io=$2; shift 2; fi
sources=${1:-200}
port=${PORT:-2610}
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p mxgate-loadtest --bin banlatency --bin mxgate-loadtest)
work=$(mktemp -d)
cleanup() { kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[access]\nlist = "access.list"\n[abuse]\nfailure_threshold = 1\nescalate_after = 0\n' "$port" > "$work/mxgate.toml"
echo "deny 127.66.0.0/16" > "$work/access.list"
MXGATE_LOG=warn "$root/target/release/mxgate" --config "$work/mxgate.toml" --io "$io" & server=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
echo "quiet:  $("$root/target/release/banlatency" "$port" "$sources")"
"$root/target/release/mxgate-loadtest" deny-storm --target "127.0.0.1:$port" --sources 127.66.0.0/16 \
  --duration 12s --concurrency 64 --threads 2 > "$work/flood.out" 2>&1 & flood=$!
sleep 2
echo "flood:  $("$root/target/release/banlatency" "$port" "$sources" "$sources")"
wait "$flood" || true
echo "flood:  $(grep -E "^(phase|main) " "$work/flood.out" | tr -s ' ' | tr '\n' ' ')"
