# Shell pieces the benchmark scripts share (sourced, not run).

# wait_port PORT: returns once something accepts on 127.0.0.1:PORT (at most 5 s), then
# half a second more for the server to settle.
wait_port() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && break; sleep 0.05; done
  sleep 0.5
}

# ticks PID: the process's CPU time so far (user + system), in clock ticks.
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# ops FILE: the first phase's operations in a mxgate-loadtest JSON report.
ops() { sed -n 's/.*"ops": \([0-9]*\).*/\1/p' "$1" | head -1; }

# per_op VARIANT TICKS OPS NAME: prints "VARIANT NAME=<µs of CPU per operation>".
per_op() { awk -v v="$1" -v t="$2" -v n="$3" -v name="$4" -v hz="$(getconf CLK_TCK)" \
  'BEGIN{printf "%s %s=%.2f\n", v, name, t * 1e6 / hz / n}'; }

# one_mxgate TOOL...: builds mxgate and the loadtest TOOLs (release), and sets `bin` (the
# build folder), `mxgate` (MXGATE, or the build's), `d` (a temporary folder) and `pid`
# (the mxgate the script starts), which are stopped and removed at exit. Needs `root`.
one_mxgate() {
  local tools=()
  for t in "$@"; do tools+=(--bin "$t"); done
  (cd "$root" && cargo build --release -q -p mxgate --bin mxgate && cargo build --release -q -p mxgate-loadtest "${tools[@]}")
  bin=$root/target/release
  mxgate=${MXGATE:-$bin/mxgate}
  d=$(mktemp -d)
  pid=
  trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$d"' EXIT
}
