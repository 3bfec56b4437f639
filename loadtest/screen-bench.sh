#!/usr/bin/env bash
# What screening costs an allowed peer, on mxgate's own CPU per connection: the relay
# load (one ~2 KiB message a connection to the harness's checking sink), alternating
# ROUNDS times between
#   a: screening off;
#   b: two DNS blocklists, every answer cached (256 source addresses, 127.77.0.0/24,
#      warmed up; pass_ttl = "0s", so that no peer skips the lookups by having passed);
#   c: the same blocklists with nothing cached (each connection a new address of
#      127.77.0.0/16, each asked of a local DNS server, loadtest's dnsserver).
# Prints µs per connection and connections/s per run, the means, b/a and c/a.
#
# usage: loadtest/screen-bench.sh [ROUNDS] [--io uring|epoll]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/loadtest/common.sh"
port=${PORT:-2716} sink=${SINK_PORT:-31036} dns=${DNS_PORT:-31037}
rounds=${1:-6} io=uring
[ "${2:-}" = --io ] && io=$3
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p mxgate-loadtest --bin mxgate-loadtest --bin dnsserver)
bin=$root/target/release
d=$(mktemp -d)
"$bin/dnsserver" "$dns" 192.0.2.0/24 & dnspid=$!
trap 'kill $dnspid 2>/dev/null; rm -rf "$d"' EXIT
base=$(printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[relay]\ndomains = ["bench.test"]\nnext_hops = ["127.0.0.1:%s"]\n' "$port" "$sink")
printf '%s\n' "$base" > "$d/a.toml"
printf '%s\n[screen]\npass_ttl = "0s"\nresolvers = ["127.0.0.1:%s"]\n[[screen.dnsbl]]\nzone = "one.test"\nweight = 1\n[[screen.dnsbl]]\nzone = "two.test"\nweight = 1\n' \
  "$base" "$dns" > "$d/b.toml"
cp "$d/b.toml" "$d/c.toml"
run() { # variant, sources, seconds
  "$bin/mxgate-loadtest" relay --target "127.0.0.1:$port" --sink "127.0.0.1:$sink" --domain bench.test \
    --sources "$2" --concurrency 32 --duration "$3" --threads 2 --json "$d/run.json" > "$d/out" 2>&1 ||
    { echo "run $1 failed:" >&2; cat "$d/out" >&2; exit 1; }
}
for _ in $(seq "$rounds"); do
  for v in a b c; do
    MXGATE_LOG=warn "$bin/mxgate" --config "$d/$v.toml" --io "$io" & pid=$!
    wait_port "$port"
    sources=127.77.0.0/16
    if [ "$v" = b ]; then sources=127.77.0.0/24; run b "$sources" 1s; fi # warm the caches
    t0=$(ticks "$pid")
    run "$v" "$sources" 5s
    t1=$(ticks "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    n=$(ops "$d/run.json")
    echo "$(per_op "$v" $((t1 - t0)) "$n" us_per_connection) connections_per_s=$((n / 5))"
  done
done | awk '{print} {split($2, x, "="); s[$1] += x[2]; c[$1]++}
  END {a = s["a"]/c["a"]; b = s["b"]/c["b"]; cc = s["c"]/c["c"];
       printf "mean a=%.2f b=%.2f c=%.2f b/a=%.3f c/a=%.3f\n", a, b, cc, b/a, cc/a}'
