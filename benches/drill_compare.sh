#!/usr/bin/env bash
# drill_compare.sh -- primary-failover drills against pglifeguard and pgpool-II on the same
# 3-node cluster, alternating (pglifeguard, pgpool, pglifeguard, pgpool, ...), with one table.
#
# Every drill is the shared drill.sh (pgpool-II: the shared pgpool_drill.sh, which runs drill.sh
# with its own setup): pgbench tpcb-like load, a persistent psql session and a reconnecting
# writer probe through the proxy; the primary (pg0) is stopped with `pg_ctl stop -m immediate`
# at KILL_AT. After each drill the proxy is stopped and `cluster.sh up` puts back pg0 as primary
# with pg1 and pg2 as its standbys. See benches/README.md. Run as root.
#
# Usage: benches/drill_compare.sh
#
# Environment (defaults):
#   DRILLS=3                      drills per target
#   DURATION=30 KILL_AT=10 CLIENTS=8   passed to drill.sh for both targets (drill.sh: 60/20/8);
#                                 PROBE_INTERVAL too when set (drill.sh default 0.05 s)
#   OUT=/tmp/pglifeguard-drills/<timestamp>   results directory of this run
#   SHARED_BENCH=<repo>/../shared/bench
#   BL=/tmp/bl                    where the shared scripts keep the cluster and pgpool-II
#   PGLIFEGUARD_BIN=<repo>/target/release/pglifeguard   (a copy in $OUT is what runs)
#   PGLIFEGUARD_PORT=6433 PGLIFEGUARD_ADMIN=127.0.0.1:9631
#   HC_PERIOD HC_TIMEOUT HC_RETRIES FAILOVER_ON_BACKEND_ERROR   pgpool.sh's knobs (its defaults
#                                 1 s / 2 s / 0 / on unless set)
#
# Exit status: 0 when every drill ran and produced a summary, 1 otherwise, 2 on a setup error.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$REPO/../shared/bench}
SHARED_BENCH=$(cd "$SHARED_BENCH" 2>/dev/null && pwd) || { echo "SHARED_BENCH directory not found" >&2; exit 2; }
DRILLS=${DRILLS:-3}
export DURATION=${DURATION:-30} KILL_AT=${KILL_AT:-10} CLIENTS=${CLIENTS:-8}
[ -n "${PROBE_INTERVAL:-}" ] && export PROBE_INTERVAL
RUN_DIR=${OUT:-/tmp/pglifeguard-drills/$(date '+%Y%m%d-%H%M%S')}
unset OUT   # each drill gets its own OUT below
PGLIFEGUARD_BIN=${PGLIFEGUARD_BIN:-$REPO/target/release/pglifeguard}
PGLIFEGUARD_PORT=${PGLIFEGUARD_PORT:-6433}
PGLIFEGUARD_ADMIN=${PGLIFEGUARD_ADMIN:-127.0.0.1:9631}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
export BL=${BL:-/tmp/bl}
PGPOOL_PORT=9999 PGBOUNCER_PORT=6432                 # fixed by pgpool.sh / pgbouncer.sh
PRIMARY_PORT=55432 STANDBY_PORTS="55433 55434"       # fixed by cluster.sh
PSQL="$PGBIN/psql -X -q -A -t -h 127.0.0.1 -U postgres"

source "$REPO/benches/lib.sh"
die() { say "ERROR: $*"; exit 2; }

# ---- preflight ----
[ "$(id -u)" = 0 ] || die "run as root (the shared scripts run the servers as the postgres user)"
for s in cluster.sh drill.sh pgpool_drill.sh pgpool.sh pgbouncer.sh common.sh; do
  [ -e "$SHARED_BENCH/$s" ] || die "$SHARED_BENCH/$s is missing (set SHARED_BENCH)"
done
[ -x /usr/sbin/pgpool ] || die "pgpool-II not installed (apt-get install -y pgpool2)"
[ -x "$PGLIFEGUARD_BIN" ] || die "$PGLIFEGUARD_BIN not found (cargo build --release)"
[[ "$DRILLS" =~ ^[1-9][0-9]*$ ]] || die "DRILLS must be a positive integer"
listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
for p in "$PGLIFEGUARD_PORT" "${PGLIFEGUARD_ADMIN##*:}"; do
  listening "$p" && die "port $p is in use; stop whatever listens there first"
done
# A running pgpool-II would fail over too while pglifeguard is drilled; pgpool_drill.sh would stop
# a running PgBouncer. Neither is ours to stop.
listening "$PGPOOL_PORT" && die "something listens on $PGPOOL_PORT (pgpool-II?); stop it first ($SHARED_BENCH/pgpool.sh down)"
listening "$PGBOUNCER_PORT" && die "something listens on $PGBOUNCER_PORT (PgBouncer?); pgpool_drill.sh would stop it: stop it first"

mkdir -p "$RUN_DIR" || die "cannot create $RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
ln -sfn "$RUN_DIR" "$(dirname "$RUN_DIR")/latest" 2>/dev/null || true
# Run a private copy: a concurrent `cargo build` must not swap the binary mid-run.
cp "$PGLIFEGUARD_BIN" "$RUN_DIR/pglifeguard" || die "cannot copy $PGLIFEGUARD_BIN"
LG_BIN=$RUN_DIR/pglifeguard
say "results in $RUN_DIR"
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || GIT_REV="$GIT_REV+dirty"
BIN_SHA=$(sha256sum "$LG_BIN" | cut -c1-12)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- state owned by this script ----
LG_PID=""
PGPOOL_USED=0
REPORTED=0


stop_pgpool() {
  [ "$PGPOOL_USED" = 1 ] || return 0
  "$SHARED_BENCH/pgpool.sh" down >&2 || say "pgpool.sh down failed"
}

in_recovery() { $PSQL -p "$1" -d postgres -c 'select pg_is_in_recovery()' 2>/dev/null; }
cluster_intact() {
  [ "$(in_recovery "$PRIMARY_PORT")" = f ] || return 1
  local p; for p in $STANDBY_PORTS; do [ "$(in_recovery "$p")" = t ] || return 1; done
  [ "$($PSQL -p "$PRIMARY_PORT" -d postgres -c "select count(*) from pg_stat_replication where state = 'streaming' and application_name in ('pg1', 'pg2')" 2>/dev/null)" = 2 ]
}
repair_cluster() { # $1 = log file
  "$SHARED_BENCH/cluster.sh" up >>"$1" 2>&1 || { say "cluster.sh up failed; see $1"; return 1; }
  "$SHARED_BENCH/cluster.sh" status >>"$1" 2>&1
  cluster_intact || { say "cluster is not pg0 primary + streaming pg1, pg2 after cluster.sh up; see $1"; return 1; }
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pglifeguard
  stop_pgpool
  # an aborted run still gets a table of the drills that finished
  [ "$REPORTED" = 1 ] || ! ls "$RUN_DIR"/[0-9]*-*/summary.txt >/dev/null 2>&1 || write_report || true
  say "final cluster.sh up"
  repair_cluster "$RUN_DIR/cluster.log" || rc=1
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- pglifeguard ----
if command -v curl >/dev/null; then
  LG_PRIMARY_CMD="curl -s http://$PGLIFEGUARD_ADMIN/status | awk '\$4==\"primary\"{print \$2}'"
else
  LG_PRIMARY_CMD="$LG_BIN ctl --admin $PGLIFEGUARD_ADMIN status | awk '\$4==\"primary\"{print \$2}'"
fi

start_drill_pglifeguard() { # $1 = drill dir (config, status file and log go there)
  local d=$1 cfg=$1/pglifeguard.yaml log=$1/pglifeguard.log
  cat > "$cfg" <<EOF
listen: 127.0.0.1:$PGLIFEGUARD_PORT
admin_listen: $PGLIFEGUARD_ADMIN
backends:
  - {name: pg0, host: 127.0.0.1, port: 55432, data_directory: $BL/pg0}
  - {name: pg1, host: 127.0.0.1, port: 55433, data_directory: $BL/pg1}
  - {name: pg2, host: 127.0.0.1, port: 55434, data_directory: $BL/pg2}
pool:
  pool_size: 40
auth:
  method: trust
health_check:
  user: postgres
  period: 1s
failover:
  failover_command: "PG_BIN=$PGBIN $REPO/conf/hooks/failover.sh %d %h %p %D %m %H %M %P %r %R %N %S"
  follow_primary_command: "PG_BIN=$PGBIN $REPO/conf/hooks/follow_primary.sh %d %h %p %D %m %H %M %P %r %R"
  status_file: status
EOF
  "$LG_BIN" check-config "$cfg" >>"$log" 2>&1 || { say "invalid config $cfg; see $log"; return 1; }
  # Own subshell + exec: $! is the proxy's own PID.
  ( ulimit -n 65536 2>/dev/null || true; export NO_COLOR=1; exec "$LG_BIN" run --config "$cfg" ) >>"$log" 2>&1 </dev/null &
  LG_PID=$!
  local deadline=$(( $(date +%s) + 30 )) primary=""
  until $PSQL -p "$PGLIFEGUARD_PORT" -d bench -c 'select 1' >/dev/null 2>&1 \
        && primary=$(timeout 2 bash -c "$LG_PRIMARY_CMD" 2>/dev/null) && [ "$primary" = pg0 ]; do
    if ! kill -0 "$LG_PID" 2>/dev/null; then
      local rc=0; wait "$LG_PID" 2>/dev/null || rc=$?; LG_PID=""
      say "pglifeguard exited (status $rc) during startup; last log lines:"; tail -n 20 "$log" >&2; return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "pglifeguard (pid $LG_PID) not serving with primary pg0 after 30 s (primary: '${primary}'); last log lines:"
      tail -n 20 "$log" >&2; stop_pglifeguard; return 1
    fi
    sleep 0.2
  done
  say "pglifeguard up on $PGLIFEGUARD_PORT, pid $LG_PID, primary $primary"
}

# ---- one drill ----
run_drill() { # $1 = drill number, $2 = target; writes $RUN_DIR/<n>-<target>/
  local n=$1 t=$2 d rc=0
  d=$RUN_DIR/$n-$t
  mkdir -p "$d"
  say "=== drill $n: $t (DURATION=$DURATION KILL_AT=$KILL_AT CLIENTS=$CLIENTS) ==="
  cluster_intact || repair_cluster "$d/cluster-before.log" || return 1
  case "$t" in
    pglifeguard)
      start_drill_pglifeguard "$d" || return 1
      OUT=$d "$SHARED_BENCH/drill.sh" "$PGLIFEGUARD_PORT" "$LG_PRIMARY_CMD" >"$d/console.log" 2>&1 || rc=$?
      curl -s "http://$PGLIFEGUARD_ADMIN/status" > "$d/pglifeguard-status-after.txt" 2>&1 || true
      stop_pglifeguard
      # WARN/ERROR lines of the proxy, and its failover timeline
      sed 's/\x1b\[[0-9;]*m//g' "$d/pglifeguard.log" | grep -E '^[^ ]+ +(WARN|ERROR) ' > "$d/pglifeguard-warn-error.txt"
      sed 's/\x1b\[[0-9;]*m//g' "$d/pglifeguard.log" \
        | grep -iE 'fail|promot|primary|follow|down|hook|attach|detach|epoch|hold' > "$d/pglifeguard-failover.txt" ;;
    pgpool)
      PGPOOL_USED=1
      OUT=$d "$SHARED_BENCH/pgpool_drill.sh" >"$d/console.log" 2>&1 || rc=$?
      stop_pgpool ;;
  esac
  [ "$rc" = 0 ] || say "drill $n ($t): exit status $rc; see $d/console.log"
  # pg0 back as primary, pg1 and pg2 re-cloned as its standbys
  repair_cluster "$d/cluster-after.log" || die "could not repair the cluster after drill $n ($t)"
  if [ ! -s "$d/summary.txt" ]; then say "drill $n ($t): no summary.txt"; return 1; fi
  say "drill $n ($t): $(grep -m1 '^WRITE DOWNTIME' "$d/summary.txt")"
  return 0
}

# ---- report ----
# One TSV row per drill from its summary.txt (and pgbench.log / session.log next to it):
# n target downtime port_after session_fate aborted failed_probes ok_probes warn_error
drill_row() { # $1 = drill dir
  local d=$1 s=$1/summary.txt n t dt port fate ab abraw fp ok we tk_hms last endtxt errs p0 p1
  n=$(basename "$d"); t=${n#*-}; n=${n%%-*}
  dt=$(sed -n 's/^WRITE DOWNTIME: first successful write after kill completed \([0-9.]*\) s.*/\1/p' "$s")
  port=$(sed -n 's/^WRITE DOWNTIME: .* served by port \([0-9]*\).*/\1/p' "$s")
  [ -n "$dt" ] || { dt=none; port=-; }
  fp=$(sed -n 's/^probes after kill: \([0-9]*\) ok, \([0-9]*\) failed.*/\2/p' "$s")
  ok=$(sed -n 's/^probes after kill: \([0-9]*\) ok, .*/\1/p' "$s")
  # drill.sh counts every pgbench.log line with "aborted" (incl. "Run was aborted"); count clients
  abraw=$(sed -n 's/^pgbench rc=.*aborted clients: \([0-9]*\).*/\1/p' "$s")
  ab=$(grep -oE 'client [0-9]+ (script [0-9]+ )?aborted' "$d/pgbench.log" 2>/dev/null | awk '{print $2}' | sort -u | wc -l)
  # persistent session: alive at the end (psql exited rc=0 when its input ended), selects after the kill
  tk_hms=$(sed -n 's/^t0 .*t_kill = [0-9.]* (\([0-9:.]*\)).*/\1/p' "$s")
  last=$(sed -n 's/^persistent session: .*; last: \([0-9:.]*\)|.*/\1/p' "$s")
  endtxt=$(sed -n 's/^persistent session: .*; end: //p' "$s")
  errs=$(grep -v '|' "$d/session.log" 2>/dev/null | grep -v 'session psql exited' | grep -c .)
  p0=$(grep '|' "$d/session.log" 2>/dev/null | head -1 | cut -d'|' -f2)
  p1=$(grep '|' "$d/session.log" 2>/dev/null | tail -1 | cut -d'|' -f2)
  local after_kill=0
  if [ -n "$last" ] && [ -n "$tk_hms" ]; then
    after_kill=$(awk -v a="$last" -v b="$tk_hms" 'function s(x, p) { split(x, p, ":"); return p[1]*3600 + p[2]*60 + p[3] }
      BEGIN { d = s(a) - s(b); if (d < -43200) d += 86400; print (d > 0) ? 1 : 0 }')
  fi
  if [ "$after_kill" = 1 ] && echo "$endtxt" | grep -q 'exited rc=0' \
     && ! grep -qiE 'connection to server was lost|server closed the connection|terminating connection' "$d/session.log"; then
    fate="survived (port $p0→$p1"
    [ "$errs" = 0 ] && fate="$fate)" || fate="$fate, $errs error lines)"
  else
    local why
    why=$(grep -v '|' "$d/session.log" 2>/dev/null | grep -v 'session psql exited' | grep -m1 . | cut -c1-80)
    fate="lost (port $p0, last select $last, kill $tk_hms${why:+: $why})"
  fi
  we=-
  [ -f "$d/pglifeguard-warn-error.txt" ] && we=$(grep -c . "$d/pglifeguard-warn-error.txt")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$t" "$dt" "$port" "$fate" "$ab" "${abraw:-?}" "${fp:-?}" "${ok:-?}" "$we"
}

median() { # numbers (or "none" = no write after the kill, sorts last) on stdin
  sed 's/^none$/inf/' | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "n/a"; exit }
    if (NR % 2) m = v[(NR + 1) / 2]; else if (v[NR/2] == "inf" || v[NR/2+1] == "inf") m = "inf"; else m = (v[NR/2] + v[NR/2+1]) / 2
    if (m == "inf") print "no write after kill"; else printf "%.3f\n", m }'
}

write_report() {
  local rows=$RUN_DIR/drills.tsv report=$RUN_DIR/report.md d t
  : > "$rows"
  for d in "$RUN_DIR"/[0-9]*-*/; do
    [ -s "$d/summary.txt" ] && drill_row "${d%/}" >> "$rows"
  done
  sort -n -o "$rows" "$rows"
  : > "$RUN_DIR/summaries.txt"
  for d in $(cut -f1,2 "$rows" | tr '\t' '-'); do
    { echo "===== drill $d"; cat "$RUN_DIR/$d/summary.txt"; echo; } >> "$RUN_DIR/summaries.txt"
  done
  {
    echo "# Failover drills: pglifeguard vs pgpool-II"
    echo
    echo "Run $(date '+%Y-%m-%d %H:%M:%S %Z') on $(hostname) ($(nproc) CPUs, load average at start: $LOAD0)."
    echo "pglifeguard $GIT_REV (binary sha256 $BIN_SHA); $("$PGBIN/postgres" --version); $(/usr/sbin/pgpool --version 2>&1 | head -1)."
    echo
    echo "drill.sh: DURATION=$DURATION s, kill of pg0 (pg_ctl stop -m immediate) at KILL_AT=$KILL_AT s, CLIENTS=$CLIENTS pgbench tpcb-like clients, probe interval ${PROBE_INTERVAL:-0.05} s; $DRILLS drills per target, alternating."
    echo
    echo "| target | setup |"
    echo "|---|---|"
    echo "| pglifeguard | 127.0.0.1:$PGLIFEGUARD_PORT, pool_size 40, health_check period 1 s (other health_check settings default), failover/follow_primary hooks from conf/hooks |"
    local ps; ps=$(find "$RUN_DIR" -name pgpool-settings.txt | head -1)
    if [ -n "$ps" ]; then
      echo "| pgpool | 127.0.0.1:$PGPOOL_PORT (pgpool_drill.sh, lb_off): $(grep -E '^(health_check_period|health_check_timeout|health_check_max_retries|failover_on_backend_error)' "$ps" | tr -s ' ' | paste -sd ';' | sed 's/;/; /g') |"
    else
      echo "| pgpool | 127.0.0.1:$PGPOOL_PORT (pgpool_drill.sh, lb_off) |"
    fi
    echo
    echo "| drill | target | write downtime (s) | writes after kill on port | persistent session | aborted pgbench clients | failed probes after kill | ok probes after kill | proxy WARN/ERROR lines |"
    echo "|---|---|---|---|---|---|---|---|---|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $8, $9, $10 }' "$rows"
    echo
    echo "Median write downtime (first successful new-connection INSERT after the kill, completion time minus kill time):"
    echo
    for t in pglifeguard pgpool; do
      local k; k=$(awk -F'\t' -v t="$t" '$2 == t' "$rows" | wc -l)
      echo "- **$t**: $(awk -F'\t' -v t="$t" '$2 == t { print $3 }' "$rows" | median) s over $k drills"
    done
    echo
    echo "Per-drill output (summary.txt, pgbench.log, probes.log, session.log, primary.log; pglifeguard.log and"
    echo "pglifeguard-warn-error.txt, or pgpool-log.txt and failover-log.txt) is in \`$RUN_DIR/<drill>-<target>/\`;"
    echo "all summaries are concatenated in \`summaries.txt\`."
  } > "$report"
  REPORTED=1
  cat "$report"
}

# ---- run ----
say "cluster.sh up"
repair_cluster "$RUN_DIR/cluster.log" || die "cluster.sh up failed"
failed=0
n=0
for i in $(seq "$DRILLS"); do
  for t in pglifeguard pgpool; do
    n=$((n + 1))
    run_drill "$n" "$t" || failed=1
  done
done
stop_pglifeguard
stop_pgpool
write_report
say "report: $RUN_DIR/report.md"
exit "$failed"
