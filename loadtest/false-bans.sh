#!/usr/bin/env bash
# Failure counting under a spread attack: do innocent addresses get banned?
# failure_threshold = FAILURES + 1 (default 5); ADDRESSES addresses each fail FAILURES
# times in one window, then 10,000 fresh addresses fail once each, then 1,000 abusers fail
# FAILURES + 1 times each; every address is then asked again (falsebans). The target:
# 0 attackers banned, at most 1 in 10,000 fresh ones, every abuser.
#
# usage: loadtest/false-bans.sh [ADDRESSES] [FAILURES] [COUNTER_MEMORY]
#        (defaults 1000000 4 64MiB; MXGATE=path runs another build, e.g. an older one:
#         without COUNTER_MEMORY=none the key is not written, as older builds refuse it)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/loadtest/common.sh"
addresses=${1:-1000000} failures=${2:-4} memory=${3:-64MiB}
port=${PORT:-2740}
one_mxgate falsebans
{
  printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[abuse]\nfailure_threshold = %s\nfailure_window = "1h"\n' \
    "$port" $((failures + 1))
  [ "$memory" = none ] || printf 'counter_memory = "%s"\n' "$memory"
  printf '[control]\nsocket = "%s/mxgate.sock"\n' "$d"
} > "$d/mxgate.toml"
MXGATE_LOG=warn "$mxgate" --config "$d/mxgate.toml" & pid=$!
wait_port "$port"
echo "== $addresses addresses x $failures failures (threshold $((failures + 1)), counter_memory $memory) =="
"$bin/falsebans" "$port" "$addresses" "$failures"
echo "rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")" \
  "$("$mxgate" stats --config "$d/mxgate.toml" | grep -E '^(bans_in_force|failure_keys_evicted) ' | tr '\n' ' ')"
