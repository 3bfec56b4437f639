#!/usr/bin/env bash
# The deny path against the cheapest possible C deny servers (shared/limits/bench.sh).
# mxgate runs with an access list of ENTRIES random prefixes plus `deny $LIMITS_DENY_CIDR`;
# with --bans N, the load's addresses are refused by bans instead: no deny line for them,
# and a ban file of N bans holding every address of $LIMITS_DENY_CIDR (the rest random).
#
# usage: loadtest/deny-bench.sh [--io uring|epoll] [--entries N] [--bans N] [bench.sh options...]
#   e.g. loadtest/deny-bench.sh --io uring --repeat 3
#        loadtest/deny-bench.sh --io uring --bans 100000 --repeat 3
# LIMITS_DIR: the folder of bench.sh (default: ../shared/limits beside this repository).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
limits=${LIMITS_DIR:-$root/../shared/limits}
io=uring entries=10000 bans=0
while [ $# -gt 0 ]; do
  case $1 in
    --io) io=$2; shift 2 ;;
    --entries) entries=$2; shift 2 ;;
    --bans) bans=$2; shift 2 ;;
    *) break ;;
  esac
done
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p mxgate-loadtest --bin genlist --bin genbans)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$root/target/release/genlist" "$entries" > "$work/base.list"
cmd="printf '[listen]\naddresses = [\"127.0.0.1:%s\"]\n[access]\nlist = \"access.list\"\n' \$LIMITS_PORT > $work/mxgate.toml"
if [ "$bans" -gt 0 ]; then
  cmd="$cmd && printf '[abuse]\nban_file = \"bans.list\"\n' >> $work/mxgate.toml && cp $work/base.list $work/access.list"
  cmd="$cmd && $root/target/release/genbans $bans \$LIMITS_DENY_CIDR > $work/bans.list"
else
  cmd="$cmd && { cat $work/base.list; echo \"deny \$LIMITS_DENY_CIDR\"; } > $work/access.list"
fi
cmd="$cmd && exec $root/target/release/mxgate --config $work/mxgate.toml --io $io"
exec "$limits/bench.sh" deny --port "${PORT:-2600}" --cmd "$cmd" "$@"
