# Helpers shared by the benchmark scripts in this folder; sourced, not run.

say() { echo "[$(date '+%H:%M:%S')] $*" >&2; }

# Stops the pglifeguard started by the calling script (PID in $LG_PID): SIGINT, then
# SIGKILL after 10 s. Only that PID is signalled.
stop_pglifeguard() {
  [ -n "$LG_PID" ] || return 0
  local p=$LG_PID i; LG_PID=""
  kill -INT "$p" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$p" 2>/dev/null; then
    say "pglifeguard pid $p still running 10 s after SIGINT; sending SIGKILL"
    kill -KILL "$p" 2>/dev/null || true
  fi
  wait "$p" 2>/dev/null || true
  say "pglifeguard stopped (pid $p)"
}
