#!/usr/bin/env bash
# What the PROXY protocol costs the deny path, measured on mxgate's own CPU: the same deny
# flood (mxgate-loadtest deny-storm, 64 at once from 127.66.0.0/16, each peer checked for
# the deny line) against a 10,000-entry access list that denies 127.66.0.0/16, three ways,
# alternating ROUNDS times:
#   a: direct, no proxy_protocol_from;
#   b: through a "balancer": proxy_protocol_from = ["127.66.0.0/16"] and every connection
#      sends a PROXY v2 header (--proxy v2) carrying its own address, judged after the header;
#   c: direct, with proxy_protocol_from set to prefixes that do not match (10.0.0.0/8 and
#      three more).
# Prints µs of CPU per refused connection for each run, the means, and b/a and c/a.
#
# usage: loadtest/proxy-ab.sh [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
port=${PORT:-2713}
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p mxgate-loadtest --bin genlist --bin mxgate-loadtest)
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
  for v in a b c; do
    MXGATE_LOG=warn "$mx/mxgate" --config "$d/$v.toml" --io uring & pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    sleep 0.5
    proxy=()
    [ "$v" = b ] && proxy=(--proxy v2)
    t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
    "$mx/mxgate-loadtest" deny-storm --target "127.0.0.1:$port" --sources 127.66.0.0/16 --expect 530 \
      --duration 4s --concurrency 64 --threads 2 "${proxy[@]}" --json "$d/run.json" > "$d/out" 2>&1 ||
      { echo "run $v failed:" >&2; cat "$d/out" >&2; exit 1; }
    t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    n=$(sed -n 's/.*"ops": \([0-9]*\).*/\1/p' "$d/run.json" | head -1)
    awk -v v="$v" -v t=$((t1 - t0)) -v n="$n" -v hz="$(getconf CLK_TCK)" \
      'BEGIN{printf "%s us_per_refusal=%.2f\n", v, t * 1e6 / hz / n}'
  done
done | awk '{print} {split($2, x, "="); s[$1] += x[2]; c[$1]++}
  END {a = s["a"]/c["a"]; b = s["b"]/c["b"]; cc = s["c"]/c["c"];
       printf "mean a=%.2f b=%.2f c=%.2f b/a=%.3f c/a=%.3f\n", a, b, cc, b/a, cc/a}'
