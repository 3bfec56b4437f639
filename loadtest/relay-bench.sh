#!/usr/bin/env bash
# The relay path against the cheapest possible C SMTP server (shared/limits/bench.sh):
# mxgate relays each message in-line to the C sink on 127.0.0.1:$LIMITS_SINK_PORT.
# The mail log (one INFO line per message) is on, as in production.
#
# usage: loadtest/relay-bench.sh [--io uring|epoll] [bench.sh options...]
#   e.g. loadtest/relay-bench.sh --io uring --repeat 3
# LIMITS_DIR: the folder of bench.sh (default: ../shared/limits beside this repository).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
limits=${LIMITS_DIR:-$root/../shared/limits}
io=uring
if [ "${1:-}" = --io ]; then io=$2; shift 2; fi
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmd="printf '[listen]\naddresses = [\"127.0.0.1:%s\"]\n[relay]\ndomains = [\"%s\"]\nnext_hops = [\"127.0.0.1:%s\"]\n'"
cmd="$cmd \$LIMITS_PORT \$LIMITS_RCPT_DOMAIN \$LIMITS_SINK_PORT > $work/mxgate.toml"
cmd="$cmd && exec $root/target/release/mxgate --config $work/mxgate.toml --io $io"
exec "$limits/bench.sh" relay --port "${PORT:-2600}" --cmd "$cmd" "$@"
