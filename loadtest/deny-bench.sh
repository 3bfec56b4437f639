#!/usr/bin/env bash
# The deny path against the cheapest possible C deny servers (shared/limits/bench.sh).
# mxgate runs with an access list of ENTRIES random prefixes plus `deny $LIMITS_DENY_CIDR`.
#
# usage: loadtest/deny-bench.sh [--io uring|epoll] [--entries N] [bench.sh options...]
#   e.g. loadtest/deny-bench.sh --io uring --repeat 3
# LIMITS_DIR: the folder of bench.sh (default: ../shared/limits beside this repository).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
limits=${LIMITS_DIR:-$root/../shared/limits}
io=uring entries=10000
while [ $# -gt 0 ]; do
  case $1 in
    --io) io=$2; shift 2 ;;
    --entries) entries=$2; shift 2 ;;
    *) break ;;
  esac
done
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p loadtest --bin genlist)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$root/target/release/genlist" "$entries" > "$work/base.list"
cmd="printf '[listen]\naddresses = [\"127.0.0.1:%s\"]\n[access]\nlist = \"access.list\"\n' \$LIMITS_PORT > $work/mxgate.toml"
cmd="$cmd && { cat $work/base.list; echo \"deny \$LIMITS_DENY_CIDR\"; } > $work/access.list"
cmd="$cmd && exec $root/target/release/mxgate --config $work/mxgate.toml --io $io"
exec "$limits/bench.sh" deny --port "${PORT:-2600}" --cmd "$cmd" "$@"
