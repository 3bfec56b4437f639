#!/usr/bin/env bash
# Screening against Postfix postscreen, on the same zones and the same DNS server, each
# connection from a new address (nothing cached): CPU per screened connection.
#   postscreen: Debian's Postfix (installed with apt-get when missing), an instance in a
#     temporary folder: postscreen on 127.0.0.1:$PS_PORT with the pregreet test (1 s) and
#     two blocklists (postscreen_dnsbl_sites = one.test*1 two.test*1), its dnsblog
#     daemons resolving through a resolv.conf inside the instance's chroot that names
#     127.0.0.1, where loadtest's dnsserver answers on port 53 (NXDOMAIN). Counted: the
#     CPU of the postscreen and dnsblog processes only (not smtpd, cleanup or the queue).
#   mxgate: the same tests ([screen] pregreet, greet_wait 1s, the same two zones, the same
#     DNS server), counted: the whole process, which also relays each message in-line.
# The load: mxgate-loadtest relay, 256 at once, 10 s, each run from its own /16.
# Needs root (port 53, Postfix); it sets /etc/postfix/main.cf's
# alternate_config_directories to let `postfix -c` run the instance.
#
# usage: loadtest/postscreen-bench.sh [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/loadtest/common.sh"
rounds=${1:-2} ps_port=${PS_PORT:-2727} mx_port=${PORT:-2728} sink=${SINK_PORT:-31039}
command -v postfix > /dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix > /dev/null
(cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p mxgate-loadtest --bin mxgate-loadtest --bin dnsserver)
bin=$root/target/release
pf=$(mktemp -d)
chmod 755 "$pf" # Postfix's daemons run as its own user
mkdir -p "$pf/conf" "$pf/data" "$pf/queue/etc"
cleanup() { postfix -c "$pf/conf" stop > /dev/null 2>&1 || true; kill "${dnspid:-}" "${mxpid:-}" 2>/dev/null || true; rm -rf "$pf"; }
trap cleanup EXIT
postconf -e "alternate_config_directories = $pf/conf"
cat > "$pf/conf/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $pf/queue
data_directory = $pf/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.bench
mydestination =
relay_domains = bench.test
relayhost = [127.0.0.1]:9
smtpd_recipient_restrictions = permit_auth_destination, reject
postscreen_dnsbl_sites = one.test*1 two.test*1
postscreen_dnsbl_threshold = 3
postscreen_greet_wait = 1s
postscreen_pre_queue_limit = 1000
postscreen_post_queue_limit = 1000
default_process_limit = 300
maillog_file = $pf/maillog
maillog_file_prefixes = $pf
CF
printf '%s\n' \
  "$ps_port inet n - y - 1 postscreen" "smtpd pass - - y - - smtpd" "dnsblog unix - - y - 0 dnsblog" \
  "tlsproxy unix - - y - 0 tlsproxy" "pickup unix n - y 60 1 pickup" "cleanup unix n - y - 0 cleanup" \
  "qmgr unix n - n 300 1 qmgr" "rewrite unix - - y - - trivial-rewrite" "bounce unix - - y - 0 bounce" \
  "defer unix - - y - 0 bounce" "trace unix - - y - 0 bounce" "verify unix - - y - 1 verify" \
  "proxymap unix - - n - - proxymap" "smtp unix - - y - - smtp" "relay unix - - y - - smtp" \
  "error unix - - y - - error" "retry unix - - y - - error" "discard unix - - y - - discard" \
  "anvil unix - - y - 1 anvil" "scache unix - - y - 1 scache" "postlog unix-dgram n - n - 1 postlogd" \
  > "$pf/conf/master.cf"
echo "nameserver 127.0.0.1" > "$pf/queue/etc/resolv.conf"
cp /etc/services /etc/hosts /etc/nsswitch.conf "$pf/queue/etc/"
chown -R postfix "$pf/data"
postfix -c "$pf/conf" set-permissions > /dev/null 2>&1 || true
postfix -c "$pf/conf" start > /dev/null 2>&1
"$bin/dnsserver" 53 192.0.2.0/24 & dnspid=$!
printf '[listen]\naddresses = ["127.0.0.1:%s"]\n[relay]\ndomains = ["bench.test"]\nnext_hops = ["127.0.0.1:%s"]\n[screen]\npregreet = true\ngreet_wait = "1s"\nresolvers = ["127.0.0.1:53"]\n[[screen.dnsbl]]\nzone = "one.test"\nweight = 1\n[[screen.dnsbl]]\nzone = "two.test"\nweight = 1\n' \
  "$mx_port" "$sink" > "$pf/mx.toml"
MXGATE_LOG=warn "$bin/mxgate" --config "$pf/mx.toml" --io uring & mxpid=$!
wait_port "$mx_port"
wait_port "$ps_port"
postfix_ticks() { for p in $(pgrep -f "postscreen|dnsblog"); do ticks "$p" 2>/dev/null; done | awk '{s+=$1} END {print s+0}'; }
connections() { grep -o "[0-9]* connections made" "$1" | grep -o "^[0-9]*"; }
load() { # target, sources, extra...
  local target=$1 sources=$2; shift 2
  "$bin/mxgate-loadtest" relay --target "127.0.0.1:$target" --domain bench.test --sources "$sources" \
    --concurrency 256 --duration 10s --threads 2 "$@" > "$pf/out" 2>&1 || true
}
load "$ps_port" 127.84.0.0/16 --unchecked # warm: postscreen's dnsblog daemons, mxgate's tables
load "$mx_port" 127.84.0.0/16 --sink "127.0.0.1:$sink"
for r in $(seq "$rounds"); do
  t0=$(postfix_ticks); load "$ps_port" "127.$((85 + 2 * r)).0.0/16" --unchecked; t1=$(postfix_ticks)
  per_op postscreen $((t1 - t0)) "$(connections "$pf/out")" us_per_connection
  t0=$(ticks "$mxpid"); load "$mx_port" "127.$((86 + 2 * r)).0.0/16" --sink "127.0.0.1:$sink"; t1=$(ticks "$mxpid")
  per_op mxgate $((t1 - t0)) "$(connections "$pf/out")" us_per_connection
done | awk '{print} {split($2, x, "="); s[$1] += x[2]; c[$1]++}
  END {p = s["postscreen"]/c["postscreen"]; m = s["mxgate"]/c["mxgate"];
       printf "mean postscreen=%.1f mxgate=%.1f mxgate/postscreen=%.3f\n", p, m, m/p}'
