#!/usr/bin/env bash
# What the PROXY protocol costs the deny path, measured on mxgate's own CPU: the same deny
# flood (mxgate-loadtest deny-storm, 64 at once from 127.66.0.0/16, each peer checked for
# the deny line) against a 10,000-entry access list that denies 127.66.0.0/16, three ways,
# alternating ROUNDS times:
#   a: direct, no proxy_protocol_from;
#   b: through a "balancer": proxy_protocol_from = ["127.66.0.0/16"] and every connection
#      sends a PROXY v2 header (--proxy v2) carrying its own address, judged after the header;
#   c: direct, with proxy_protocol_from set to prefixes that do not match (10.0.0.0/8 and
#      three more);
# and the yardstick for the read itself, the least any server can do (denyfloor, one
# epoll loop a thread, no parsing, no state), both under the same --proxy v2 flood:
#   d: accept, the line, close;  e: accept, wait for and read the header, the line, close.
# Prints µs of CPU per refused connection for each run, the means, b/a, c/a and e/d.
#
# usage: loadtest/proxy-ab.sh [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/loadtest/common.sh"
port=${PORT:-2713}
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p mxgate-loadtest --bin genlist --bin mxgate-loadtest --bin denyfloor)
mx=$root/target/release
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
"$mx/genlist" 10000 > "$d/base.list"
{ cat "$d/base.list"; echo "deny 127.66.0.0/16"; } > "$d/access.list"
conf() { printf '[listen]\naddresses = ["127.0.0.1:%s"]\n%s\n[access]\nlist = "access.list"\n' "$port" "$1"; }
conf '' > "$d/a.toml"
conf 'proxy_protocol_from = ["127.66.0.0/16"]' > "$d/b.toml"
conf 'proxy_protocol_from = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8"]' > "$d/c.toml"
for _ in $(seq "${1:-8}"); do
  for v in a b c d e; do
    case $v in
      d) "$mx/denyfloor" "$port" direct 2 & pid=$! ;;
      e) "$mx/denyfloor" "$port" read 2 & pid=$! ;;
      *) MXGATE_LOG=warn "$mx/mxgate" --config "$d/$v.toml" --io uring & pid=$! ;;
    esac
    wait_port "$port"
    proxy=()
    case $v in b | d | e) proxy=(--proxy v2) ;; esac
    t0=$(ticks "$pid")
    "$mx/mxgate-loadtest" deny-storm --target "127.0.0.1:$port" --sources 127.66.0.0/16 --expect 530 \
      --duration 4s --concurrency 64 --threads 2 "${proxy[@]}" --json "$d/run.json" > "$d/out" 2>&1 ||
      { echo "run $v failed:" >&2; cat "$d/out" >&2; exit 1; }
    t1=$(ticks "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    n=$(ops "$d/run.json")
    per_op "$v" $((t1 - t0)) "$n" us_per_refusal
  done
done | awk '{print} {split($2, x, "="); s[$1] += x[2]; c[$1]++}
  END {a = s["a"]/c["a"]; b = s["b"]/c["b"]; cc = s["c"]/c["c"]; dd = s["d"]/c["d"]; e = s["e"]/c["e"];
       printf "mean a=%.2f b=%.2f c=%.2f d=%.2f e=%.2f b/a=%.3f c/a=%.3f e/d=%.3f\n", a, b, cc, dd, e, b/a, cc/a, e/dd}'
