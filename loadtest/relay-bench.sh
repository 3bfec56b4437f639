#!/usr/bin/env bash
# The relay path against the cheapest possible C SMTP server (loadtest/compare.sh relay,
# mxgate-loadtest as the client of both): mxgate relays each ~2 KiB message in-line to a C
# sink (limit_accept) on 127.0.0.1:$SINK_PORT, whose count must grow by exactly the
# messages accepted. The mail log (one INFO line per message) is on, as in production.
#
# usage: loadtest/relay-bench.sh [--io uring|epoll] [compare.sh options: --repeat N, --pipeline...]
#   e.g. loadtest/relay-bench.sh --io uring --repeat 5 --pipeline
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
io=uring
if [ "${1:-}" = --io ]; then io=$2; shift 2; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[relay]\ndomains = ["bench.test"]\nnext_hops = ["127.0.0.1:%s"]\n' \
  "${PORT:-2600}" "${SINK_PORT:-31025}" > "$work/mxgate.toml"
"$root/loadtest/compare.sh" relay --config "$work/mxgate.toml" --io "$io" "$@"
