# Helpers shared by the benchmark scripts in this folder; sourced, not run.

say() { echo "[$(date '+%H:%M:%S')] $*" >&2; }

# Sends signal $2 (INT, TERM...) to process $1 and waits up to 10 s for it to exit; returns 1
# if it is still running then. Only that PID is signalled.
signal_and_wait() {
  local i
  kill -"$2" "$1" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  return 1
}

# Stops the pglifeguard started by the calling script (PID in $LG_PID): SIGINT, then
# SIGKILL after 10 s. Only that PID is signalled.
stop_pglifeguard() {
  [ -n "$LG_PID" ] || return 0
  local p=$LG_PID; LG_PID=""
  if ! signal_and_wait "$p" INT; then
    say "pglifeguard pid $p still running 10 s after SIGINT; sending SIGKILL"
    kill -KILL "$p" 2>/dev/null || true
  fi
  wait "$p" 2>/dev/null || true
  say "pglifeguard stopped (pid $p)"
}

# Starts pglifeguard in front of the shared bench cluster with trust auth and waits until it
# serves the bench database; sets LG_PID. Writes pglifeguard.yaml and appends to
# pglifeguard.log in directory $1. Reads PGLIFEGUARD_BIN, PGLIFEGUARD_PORT,
# PGLIFEGUARD_METRICS_PORT, PGLIFEGUARD_POOL_SIZE, PGLIFEGUARD_WORKERS, PRIMARY_PORT,
# STANDBY_PORTS and PGBIN from the caller, and optionally PGLIFEGUARD_WRAPPER (a command the
# proxy runs under, e.g. valgrind; it must exec the proxy in its own process) and
# PGLIFEGUARD_START_TIMEOUT (seconds, default 30). Returns 1 (with the log's tail) if it exits
# or does not serve in time.
start_pglifeguard() { # $1 = directory for its config and log
  local cfg=$1/pglifeguard.yaml log=$1/pglifeguard.log b
  {
    echo "listen: 127.0.0.1:$PGLIFEGUARD_PORT"
    echo "metrics_listen: 127.0.0.1:$PGLIFEGUARD_METRICS_PORT"
    echo "backends:"
    echo "  - {name: pg0, host: 127.0.0.1, port: $PRIMARY_PORT}"
    local i=1; for b in $STANDBY_PORTS; do echo "  - {name: pg$i, host: 127.0.0.1, port: $b}"; i=$((i + 1)); done
    echo "pool:"
    echo "  pool_size: $PGLIFEGUARD_POOL_SIZE"
    echo "auth:"
    echo "  method: trust"
    echo "worker_threads: $PGLIFEGUARD_WORKERS"
    echo "health_check:"
    echo "  user: postgres"
    echo "  period: 2s"
  } > "$cfg"
  # Own subshell + exec: $! is the proxy's own PID. setsid gives the proxy a session of its own,
  # as a service manager would and as `pgbouncer -d` does for itself: with the kernel's
  # autogroup scheduling (sched_autogroup_enabled=1), a proxy left in this script's session
  # shares one CPU share with pgbench's threads and is preempted more often than a
  # daemonized PgBouncer. setsid does not fork here (the subshell is no group leader).
  # shellcheck disable=SC2086 # the wrapper is a command line, split into words on purpose
  ( ulimit -n 65536 2>/dev/null || true; exec setsid ${PGLIFEGUARD_WRAPPER:-} "$PGLIFEGUARD_BIN" run --config "$cfg" ) >>"$log" 2>&1 </dev/null &
  LG_PID=$!
  local timeout=${PGLIFEGUARD_START_TIMEOUT:-30}
  local deadline=$(( $(date +%s) + timeout ))
  until "$PGBIN/psql" -X -q -A -t -h 127.0.0.1 -p "$PGLIFEGUARD_PORT" -U postgres -d bench \
          -c 'select count(*) from pgbench_branches' >/dev/null 2>&1; do
    if ! kill -0 "$LG_PID" 2>/dev/null; then
      local rc=0; wait "$LG_PID" 2>/dev/null || rc=$?; LG_PID=""
      say "pglifeguard exited (status $rc) during startup; last log lines:"; tail -n 20 "$log" >&2; return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "pglifeguard (pid $LG_PID) not serving queries after $timeout s; last log lines:"; tail -n 20 "$log" >&2
      stop_pglifeguard; return 1
    fi
    sleep 0.2
  done
  say "pglifeguard up on $PGLIFEGUARD_PORT, pid $LG_PID"
}

# TPS and number of transactions from pgbench output on stdin: "tps txns" (empty when
# pgbench printed no summary).
pgbench_result() {
  awk '/^tps = / { tps = $3 } /^number of transactions actually processed: / { split($6, n, "/"); txns = n[1] }
       END { if (txns != "") print tps, txns }'
}

# Voluntary and involuntary context switches of all threads of process $1: "vol invol".
proc_switches() {
  cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt_switches/ { v += $2 } /^nonvoluntary_ctxt_switches/ { i += $2 } END { print v, i }'
}
