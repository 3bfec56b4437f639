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
