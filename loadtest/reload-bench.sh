#!/usr/bin/env bash
# Reloads under load: the relay bench (shared/limits/bench.sh relay, as relay-bench.sh) while
# mxgate's access list of ENTRIES random prefixes is replaced (by rename) by another one
# and mxgate is sent SIGHUP every EVERY seconds. bench.sh verifies each run as usual: no
# connection error, and the sink got exactly the messages the client saw accepted. Then
# prints how many reloads mxgate logged as done and as refused (none should be).
#
# usage: loadtest/reload-bench.sh [--io uring|epoll] [--entries N] [--every SECONDS] [bench.sh options...]
#   e.g. loadtest/reload-bench.sh --io uring --repeat 3
# LIMITS_DIR: the folder of bench.sh (default: ../shared/limits beside this repository).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
limits=${LIMITS_DIR:-$root/../shared/limits}
io=uring entries=10000 every=0.05
while [ $# -gt 0 ]; do
  case $1 in
    --io) io=$2; shift 2 ;;
    --entries) entries=$2; shift 2 ;;
    --every) every=$2; shift 2 ;;
    *) break ;;
  esac
done
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p mxgate-loadtest --bin genlist)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$root/target/release/genlist" "$entries" 1 > "$work/a.list"
"$root/target/release/genlist" "$entries" 2 > "$work/b.list"
config="[listen]\naddresses = [\"127.0.0.1:%s\"]\n[access]\nlist = \"access.list\"\n"
config="$config[relay]\ndomains = [\"%s\"]\nnext_hops = [\"127.0.0.1:%s\"]\n"
cmd="printf '$config' \$LIMITS_PORT \$LIMITS_RCPT_DOMAIN \$LIMITS_SINK_PORT > $work/mxgate.toml"
cmd="$cmd && cp $work/a.list $work/access.list"
# after exec, \$\$ is mxgate; the first signal waits until it has started (SIGHUP before
# its signal mask is set would end it); the loop ends with mxgate
loop="sleep 1; n=0; while kill -0 \$\$ 2>/dev/null; do n=\$((n + 1));"
loop="$loop if [ \$((n % 2)) = 1 ]; then src=b; else src=a; fi;"
loop="$loop cp $work/\$src.list $work/next.list && mv $work/next.list $work/access.list;"
loop="$loop kill -HUP \$\$ 2>/dev/null || break; sleep $every; done"
cmd="$cmd && { ( $loop ) & } && exec $root/target/release/mxgate --config $work/mxgate.toml --io $io 2>> $work/mxgate.log"
status=0
"$limits/bench.sh" relay --port "${PORT:-2600}" --cmd "$cmd" "$@" || status=$?
echo "reloads done: $(grep -c 'SIGHUP: reloaded' "$work/mxgate.log" || true)," \
  "refused: $(grep -c 'reload refused' "$work/mxgate.log" || true)," \
  "messages logged: $(grep -c ' mail id=' "$work/mxgate.log" || true)"
exit "$status"
