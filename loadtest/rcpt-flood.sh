#!/usr/bin/env bash
# Peers flooding RCPT while the next hop sits on their MAIL (issue 19): mxgate's CPU
# (cores) and RSS growth over the flood, and how long a fresh peer waits for its banner.
# The next hop (rcptflood's own) answers nothing from MAIL on for SECONDS, then accepts.
#
# usage: loadtest/rcpt-flood.sh [SECONDS] [--io uring|epoll]   (MXGATE=path: another build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/loadtest/common.sh"
seconds=${1:-30} io=uring
[ "${2:-}" = --io ] && io=$3
port=${PORT:-2750} hop_port=${HOP_PORT:-2751}
one_mxgate rcptflood
printf '[listen]\naddresses = ["127.0.0.1:%s"]\nthreads = 2\n[relay]\ndomains = ["example.com"]\nnext_hops = ["127.0.0.1:%s"]\nreply_timeout = "%ss"\n' \
  "$port" "$hop_port" $((seconds + 30)) > "$d/mxgate.toml"
MXGATE_LOG=warn "$mxgate" --config "$d/mxgate.toml" --io "$io" & pid=$!
wait_port "$port"
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
rss0=$(rss) t0=$(ticks "$pid") s0=$(date +%s.%N)
HOP_PORT=$hop_port "$bin/rcptflood" "$port" "$seconds" > "$d/out" &
flood=$!
sleep "$seconds"
rss1=$(rss) t1=$(ticks "$pid") s1=$(date +%s.%N)
wait "$flood"
cat "$d/out"
awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v a="$s0" -v b="$s1" -v r0="$rss0" -v r1="$rss1" \
  'BEGIN {printf "cores=%.3f rss_growth_kib=%d (rss %d -> %d KiB) over %.1f s\n", t / hz / (b - a), r1 - r0, r0, r1, b - a}'
