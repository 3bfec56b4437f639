#!/usr/bin/env bash
# The deny path against the cheapest possible C deny servers (loadtest/compare.sh deny,
# mxgate-loadtest as the client of both). mxgate runs with an access list of ENTRIES
# random prefixes plus `deny 127.66.0.0/16`; with --bans N, the load's addresses are
# refused by bans instead: no deny line for them, and a ban file of N bans holding every
# address of 127.66.0.0/16 (the rest random).
#
# usage: loadtest/deny-bench.sh [--io uring|epoll] [--entries N] [--bans N] [compare.sh options...]
#   e.g. loadtest/deny-bench.sh --io uring --repeat 3
#        loadtest/deny-bench.sh --io uring --bans 100000 --repeat 3
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
io=uring entries=10000 bans=0
while [ $# -gt 0 ]; do
  case $1 in
    --io) io=$2; shift 2 ;;
    --entries) entries=$2; shift 2 ;;
    --bans) bans=$2; shift 2 ;;
    *) break ;;
  esac
done
(cd "$root" && cargo build --release -q -p mxgate-loadtest --bin genlist --bin genbans)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$root/target/release/genlist" "$entries" > "$work/base.list"
printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[access]\nlist = "access.list"\n' "${PORT:-2600}" > "$work/mxgate.toml"
if [ "$bans" -gt 0 ]; then
  printf '[abuse]\nban_file = "bans.list"\n' >> "$work/mxgate.toml"
  cp "$work/base.list" "$work/access.list"
  "$root/target/release/genbans" "$bans" 127.66.0.0/16 > "$work/bans.list"
else
  { cat "$work/base.list"; echo "deny 127.66.0.0/16"; } > "$work/access.list"
fi
"$root/loadtest/compare.sh" deny --config "$work/mxgate.toml" --io "$io" "$@"
