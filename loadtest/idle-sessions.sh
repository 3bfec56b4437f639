#!/usr/bin/env bash
# Resident memory an idle session costs: mxgate with N sessions open, each past its EHLO
# and waiting for a command, against the same mxgate with none; for each driver. With
# --tls each session first does STARTTLS (a full handshake, ECDSA P-256) and says EHLO
# again under TLS.
# usage: loadtest/idle-sessions.sh [--tls] [N] (default 10000); builds release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
tls=
if [ "${1:-}" = --tls ]; then tls=yes; shift; fi
n=${1:-10000}
# each process holds one descriptor a session (idlepeers its client sockets, mxgate its own)
want=$(( n + 1024 )) hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
  echo "needs $want open files a process; the hard limit is $hard" >&2; exit 2
fi
ulimit -n "$want"
cargo build --release -q --bin mxgate -p mxgate
cargo build --release -q --bin idlepeers --bin gencert -p mxgate-loadtest
dir=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
peer_tls=()
if [ -n "$tls" ]; then
  target/release/gencert "$dir" mx.test
  peer_tls=("$dir/cert.pem" mx.test)
fi

for io in uring epoll; do
  port=$(( 2700 + RANDOM % 1000 ))
  printf 'hostname = "mx.test"\n[listen]\naddresses = ["127.0.0.1:%s"]\nthreads = 2\nmax_connections = %s\n[abuse]\nmax_connections_per_ip = 1000\n' \
    "$port" $(( n + 100 )) > "$dir/mxgate.toml"
  [ -n "$tls" ] && printf '[tls]\ncert = "cert.pem"\nkey = "key.pem"\n' >> "$dir/mxgate.toml"
  target/release/mxgate --config "$dir/mxgate.toml" --io "$io" 2> "$dir/log" &
  pid=$!
  for _ in $(seq 1 100); do grep -q "mxgate listening" "$dir/log" && break; sleep 0.1; done
  grep -q "io=$io" "$dir/log" || { cat "$dir/log"; exit 1; }
  before=$(rss "$pid")
  coproc PEERS { target/release/idlepeers "$port" "$n" "${peer_tls[@]}"; }
  read -r ready count <&"${PEERS[0]}" || { echo "idlepeers failed"; exit 1; }
  sleep 1
  after=$(rss "$pid")
  exec {PEERS[1]}>&-
  wait "$PEERS_PID" 2>/dev/null || true
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  awk -v io="$io" -v n="$count" -v b="$before" -v a="$after" \
    -v what="${tls:+ TLS}" \
    'BEGIN { printf "%s: %d idle%s sessions: rss %d -> %d KiB, %.2f KiB a session\n", io, n, what, b, a, (a - b) / n }'
done
