#!/usr/bin/env bash
# STARTTLS against its yardsticks, round by round, so that each round's figures come from
# the same minute of this machine (whose speed moves by up to 2x within an hour):
#   - the crypto alone, from `openssl speed`: a full TLS 1.3 handshake costs the server one
#     X25519 key generation and one X25519 agreement (counted as two `ecdh (X25519)` ops)
#     and one ECDSA P-256 signature;
#   - `mxgate-loadtest tls` against a spawned mxgate: relay in clear, with a full handshake
#     a connection, and resumed; mxgate's CPU per message and the harness's (clients and
#     sink, which share the machine's cores with it).
# Per round it prints: mxgate's CPU per full handshake (tls-full minus plain, per message)
# over the crypto alone; the TLS relay rate over the plaintext rate (full and resumed); and
# the rate an mxgate whose TLS cost nothing beyond plaintext would reach under the same
# harness, (mxgate + harness CPU in clear) / (mxgate's in clear + the harness's with TLS):
# the most this 2-core machine allows while the client shares it; and the budget: the
# most mxgate's TLS could cost a message for the full-handshake rate to reach 0.4x plain
# under the same harness (negative: not even at no cost).
#
# usage: loadtest/tls-bench.sh [ROUNDS] (default 5); builds release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
command -v openssl > /dev/null || { echo "needs openssl (the crypto yardstick)" >&2; exit 2; }
cargo build --release -q --bin mxgate -p mxgate
cargo build --release -q --bin mxgate-loadtest -p mxgate-loadtest
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

echo "# round crypto_us handshake_us handshake/crypto rate_full/plain rate_resumed/plain bound_full/plain budget_us"
for r in $(seq 1 "$rounds"); do
  openssl speed -seconds 1 ecdhx25519 ecdsap256 > "$dir/speed" 2> /dev/null
  crypto=$(awk '/ecdsa \(nistp256\)/ { sign = $(NF-1) } /ecdh \(X25519\)/ { dh = $NF }
                END { printf "%.1f", 2 * 1e6 / dh + 1e6 / sign }' "$dir/speed")
  target/release/mxgate-loadtest tls --spawn target/release/mxgate --duration 3s \
    --concurrency 16 --json "$dir/run.json" > "$dir/out" 2>&1 || { cat "$dir/out" >&2; exit 1; }
  python3 - "$dir/run.json" "$r" "$crypto" <<'EOF'
import json, sys
phases = {p["phase"]: p for p in json.load(open(sys.argv[1]))["phases"]}
plain, full, resumed = phases["plain"], phases["tls-full"], phases["tls-resumed"]
crypto = float(sys.argv[3])
handshake = full["server_cpu_us_per_op"] - plain["server_cpu_us_per_op"]
clear = plain["server_cpu_us_per_op"] + plain["harness_cpu_us_per_op"]
bound = clear / (plain["server_cpu_us_per_op"] + full["harness_cpu_us_per_op"])
budget = clear / 0.4 - (plain["server_cpu_us_per_op"] + full["harness_cpu_us_per_op"])
print(f"round {sys.argv[2]} {crypto:.1f} {handshake:.1f} {handshake / crypto:.2f} "
      f"{full['throughput'] / plain['throughput']:.3f} {resumed['throughput'] / plain['throughput']:.3f} {bound:.3f} {budget:.1f}")
EOF
done
