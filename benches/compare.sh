#!/usr/bin/env bash
# compare.sh -- pgbench pglifeguard side by side with PostgreSQL itself, PgBouncer (session mode)
# and pgpool-II (load balancing off), on the same 3-node cluster, in one run.
#
# Uses the shared bench scripts (cluster.sh, bench.sh, pgbouncer.sh, pgpool.sh, report.py) from
# $SHARED_BENCH; see benches/README.md. Run as root (the servers run as the postgres OS user).
#
# Usage: benches/compare.sh
#
# Environment (defaults):
#   TARGETS="direct pglifeguard pgbouncer pgpool"   which targets, in this order; two more serve
#                                    as controls: pglifeguard-b (a second pglifeguard, of
#                                    PGLIFEGUARD_BIN_B) and pgbouncer-b (a second PgBouncer with the
#                                    same settings). A target against its own second copy shows
#                                    how far two identical proxies differ in this run: the noise
#                                    any comparison of two proxies has to be read against
#   OUT=/tmp/pglifeguard-bench       results go to $OUT/<timestamp>/; $OUT/latest points at the last run
#   SHARED_BENCH=<repo>/../shared/bench
#   BL=/tmp/bl                       where the shared scripts keep the cluster, PgBouncer and pgpool
#   ORDER=cell                       cell: start every target once, then run each cell on every
#                                    target back to back, in a balanced order per round (a Williams
#                                    design: use a multiple of the number of targets as ROUNDS, or of
#                                    twice that number when it is odd);
#                                    target: one target's whole matrix after the other, each target
#                                    started before and stopped after its matrix
#   ROUNDS=1                         samples per cell and target (cell order), or times the whole
#                                    target sequence is repeated (target order)
#   WARMUP=5                         cell order: seconds each target runs a cell, unrecorded, before
#                                    its first sample (0 = none). Without a warm-up, a cell's first
#                                    sample came out about 5 % below the target's others, for
#                                    pglifeguard and PgBouncer alike (benches/README.md)
#   CLUSTER_DOWN=auto                stop the cluster at the end: auto = only if this script started it,
#                                    1 = always, 0 = never
#   PGLIFEGUARD_BIN=<repo>/target/release/pglifeguard   built with `cargo build --release` if missing
#   PGLIFEGUARD_PORT=6433  PGLIFEGUARD_METRICS_PORT=9187  PGLIFEGUARD_POOL_SIZE=40
#   PGLIFEGUARD_WORKERS=1            worker_threads (1 = single-threaded, 0 = one per core)
#   PGLIFEGUARD_BIN_B=$PGLIFEGUARD_BIN  PGLIFEGUARD_B_PORT=6434  PGLIFEGUARD_B_METRICS_PORT=9188
#   PGBOUNCER_B_PORT=6435            the second PgBouncer (target pgbouncer-b)
#   POOL_SIZE=$PGLIFEGUARD_POOL_SIZE PgBouncer default_pool_size (pgbouncer.sh reads it)
#   HC_TIMEOUT=10 HC_RETRIES=3       pgpool-II health check for the run (pgpool.sh defaults 2 / 0 let a
#                                    CPU-saturated box fail over a healthy primary mid-benchmark)
#   Passed through to bench.sh: CLIENTS DURATION REPEAT PROTOCOLS WORKLOADS JOBS PGBENCH_EXTRA
#   (bench.sh defaults: CLIENTS="1 8 32" DURATION=15 REPEAT=1 PROTOCOLS="simple prepared"
#    WORKLOADS="select tpcb" JOBS=2)
#
# Exit status: 0 when every target ran and every pgbench cell succeeded, 1 otherwise.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$REPO/../shared/bench}
SHARED_BENCH=$(cd "$SHARED_BENCH" 2>/dev/null && pwd) || { echo "SHARED_BENCH directory not found" >&2; exit 2; }
TARGETS=${TARGETS:-"direct pglifeguard pgbouncer pgpool"}
OUT=${OUT:-/tmp/pglifeguard-bench}
ROUNDS=${ROUNDS:-1}
ORDER=${ORDER:-cell}
WARMUP=${WARMUP:-5}
CLUSTER_DOWN=${CLUSTER_DOWN:-auto}
PGLIFEGUARD_BIN=${PGLIFEGUARD_BIN:-$REPO/target/release/pglifeguard}
PGLIFEGUARD_PORT=${PGLIFEGUARD_PORT:-6433}
PGLIFEGUARD_METRICS_PORT=${PGLIFEGUARD_METRICS_PORT:-9187}
PGLIFEGUARD_POOL_SIZE=${PGLIFEGUARD_POOL_SIZE:-40}
PGLIFEGUARD_WORKERS=${PGLIFEGUARD_WORKERS:-1}
PGLIFEGUARD_BIN_B=${PGLIFEGUARD_BIN_B:-$PGLIFEGUARD_BIN}
PGLIFEGUARD_B_PORT=${PGLIFEGUARD_B_PORT:-6434}
PGLIFEGUARD_B_METRICS_PORT=${PGLIFEGUARD_B_METRICS_PORT:-9188}
PGBOUNCER_B_PORT=${PGBOUNCER_B_PORT:-6435}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
export BL=${BL:-/tmp/bl}
export CLIENTS=${CLIENTS:-"1 8 32"} DURATION=${DURATION:-15} REPEAT=${REPEAT:-1}
export PROTOCOLS=${PROTOCOLS:-"simple prepared"} WORKLOADS=${WORKLOADS:-"select tpcb"} JOBS=${JOBS:-2}

# pgpool.sh reads these; a failover in the middle of a benchmark would measure a split-brain cluster.
export HC_TIMEOUT=${HC_TIMEOUT:-10} HC_RETRIES=${HC_RETRIES:-3}
# PgBouncer's pool as large as pglifeguard's (pgbouncer.sh default 20): in session mode, clients
# beyond the pool wait for a whole session to end, and pgbench -M prepared then stalls until
# query_wait_timeout at 32 clients.
export POOL_SIZE=${POOL_SIZE:-$PGLIFEGUARD_POOL_SIZE}

PRIMARY_PORT=55432 STANDBY_PORTS="55433 55434"   # fixed by the shared cluster.sh
PGBOUNCER_PORT=6432 PGPOOL_PORT=9999              # fixed by pgbouncer.sh / pgpool.sh

source "$REPO/benches/lib.sh"
die() { say "ERROR: $*"; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root (the shared scripts start servers as the postgres user)"
for s in cluster.sh bench.sh pgbouncer.sh pgpool.sh report.py; do
  [ -e "$SHARED_BENCH/$s" ] || die "$SHARED_BENCH/$s is missing (set SHARED_BENCH)"
done
case "$ORDER" in cell|target) ;; *) die "ORDER must be cell or target, not '$ORDER'" ;; esac
for t in $TARGETS; do
  case "$t" in
    direct|pglifeguard|pglifeguard-b) ;;
    pgbouncer|pgbouncer-b) command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || die "pgbouncer not installed (apt-get install -y pgbouncer)" ;;
    pgpool) [ -x /usr/sbin/pgpool ] || die "pgpool-II not installed (apt-get install -y pgpool2)" ;;
    *) die "unknown target '$t' (known: direct pglifeguard pgbouncer pgpool pglifeguard-b pgbouncer-b)" ;;
  esac
done
case " $TARGETS " in
  *" pglifeguard "*)
    if [ ! -x "$PGLIFEGUARD_BIN" ]; then
      say "building $PGLIFEGUARD_BIN"
      (cd "$REPO" && cargo build --release) || die "cargo build --release failed"
    fi
    [ -x "$PGLIFEGUARD_BIN" ] || die "$PGLIFEGUARD_BIN not found" ;;
esac
case " $TARGETS " in
  *" pglifeguard-b "*) [ -x "$PGLIFEGUARD_BIN_B" ] || die "$PGLIFEGUARD_BIN_B not found (PGLIFEGUARD_BIN_B)" ;;
esac

RUN_DIR=$OUT/$(date '+%Y%m%d-%H%M%S')
mkdir -p "$RUN_DIR"
ln -sfn "$RUN_DIR" "$OUT/latest"
export RESULTS=$RUN_DIR/results.tsv RAWDIR=$RUN_DIR/raw
REPORT=$RUN_DIR/report.md
say "results in $RUN_DIR"
# Run a private copy: a concurrent `cargo build` must not swap the binary mid-run.
case " $TARGETS " in
  *" pglifeguard "*)
    cp "$PGLIFEGUARD_BIN" "$RUN_DIR/pglifeguard"
    PGLIFEGUARD_BIN=$RUN_DIR/pglifeguard ;;
esac
case " $TARGETS " in
  *" pglifeguard-b "*)
    mkdir -p "$RUN_DIR/b"
    cp "$PGLIFEGUARD_BIN_B" "$RUN_DIR/b/pglifeguard"
    PGLIFEGUARD_BIN_B=$RUN_DIR/b/pglifeguard ;;
esac

# ---- state owned by this script, torn down on exit ----
LG_PID="" LG_B_PID="" PB_B_PID=""
STARTED_CLUSTER=0
cleanup() {
  local rc=$?
  stop_pglifeguard
  stop_pglifeguard_b
  stop_pgbouncer_b
  case " $TARGETS " in *" pgbouncer "*) "$SHARED_BENCH/pgbouncer.sh" down || true ;; esac
  case " $TARGETS " in *" pgpool "*) "$SHARED_BENCH/pgpool.sh" down || true ;; esac
  if [ "$CLUSTER_DOWN" = 1 ] || { [ "$CLUSTER_DOWN" = auto ] && [ "$STARTED_CLUSTER" = 1 ]; }; then
    "$SHARED_BENCH/cluster.sh" down || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- cluster ----
primary_pid_file=$BL/pg0/postmaster.pid
if ! { [ -f "$primary_pid_file" ] && kill -0 "$(head -1 "$primary_pid_file")" 2>/dev/null; }; then
  STARTED_CLUSTER=1
fi
"$SHARED_BENCH/cluster.sh" up || die "cluster.sh up failed"

# ---- the control targets: second copies of pglifeguard and PgBouncer ----

# Starts the second pglifeguard (its config and log in $RUN_DIR/b); sets LG_B_PID.
start_pglifeguard_b() {
  local first=$LG_PID rc=0
  LG_PID=""
  PGLIFEGUARD_BIN=$PGLIFEGUARD_BIN_B PGLIFEGUARD_PORT=$PGLIFEGUARD_B_PORT \
    PGLIFEGUARD_METRICS_PORT=$PGLIFEGUARD_B_METRICS_PORT start_pglifeguard "$RUN_DIR/b" || rc=$?
  LG_B_PID=$LG_PID LG_PID=$first
  return "$rc"
}
stop_pglifeguard_b() {
  local first=$LG_PID
  LG_PID=$LG_B_PID; stop_pglifeguard; LG_B_PID="" LG_PID=$first
}

# Starts a second PgBouncer, configured as pgbouncer.sh configures the first (its config,
# with another port and its own files in $RUN_DIR/pgbouncer-b); sets PB_B_PID.
start_pgbouncer_b() {
  local d=$RUN_DIR/pgbouncer-b shared=$BL/pgbouncer/pgbouncer.ini i
  if ! grep -q '^pool_mode = session$' "$shared" 2>/dev/null; then
    # pgbouncer.sh writes its config when it starts; the first PgBouncer is stopped again
    # below unless it is a target too.
    "$SHARED_BENCH/pgbouncer.sh" up session || return 1
    case " $TARGETS " in *" pgbouncer "*) ;; *) "$SHARED_BENCH/pgbouncer.sh" down ;; esac
  fi
  mkdir -p "$d"
  sed -e "s|^listen_port = .*|listen_port = $PGBOUNCER_B_PORT|" -e "s|^unix_socket_dir = .*|unix_socket_dir = $d|" \
      -e "s|^auth_file = .*|auth_file = $d/userlist.txt|" -e "s|^logfile = .*|logfile = $d/pgbouncer.log|" \
      -e "s|^pidfile = .*|pidfile = $d/pgbouncer.pid|" "$shared" > "$d/pgbouncer.ini"
  cp "$BL/pgbouncer/userlist.txt" "$d/userlist.txt"
  chown -R postgres:postgres "$d"
  runuser -u postgres -- bash -c "ulimit -n 20000 && exec /usr/sbin/pgbouncer -d '$d/pgbouncer.ini'" || return 1
  for i in $(seq 50); do
    if [ -s "$d/pgbouncer.pid" ] && "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PGBOUNCER_B_PORT" -U postgres -d pgbouncer \
         -c 'show version' >/dev/null 2>&1; then
      PB_B_PID=$(cat "$d/pgbouncer.pid")
      say "second pgbouncer up on $PGBOUNCER_B_PORT, pid $PB_B_PID"
      return 0
    fi
    sleep 0.1
  done
  say "the second pgbouncer did not come up; see $d/pgbouncer.log"
  return 1
}
stop_pgbouncer_b() { # SIGINT (fast shutdown) to the PID from its own pidfile, as pgbouncer.sh does
  [ -n "$PB_B_PID" ] || return 0
  local p=$PB_B_PID; PB_B_PID=""
  signal_and_wait "$p" INT || true
  say "second pgbouncer stopped (pid $p)"
}


# ---- run header (report.py prepends baseline-head.md from the report's directory) ----
git_rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || git_rev="$git_rev+dirty"
{
  echo "# pglifeguard vs PostgreSQL, PgBouncer, pgpool-II"
  echo
  echo "Run $(date '+%Y-%m-%d %H:%M:%S %Z') on $(hostname) ($(nproc) CPUs, load average at start: $(cut -d' ' -f1-3 /proc/loadavg))."
  echo "pglifeguard $git_rev; $("$PGBIN/postgres" --version); $( (pgbouncer --version 2>/dev/null || /usr/sbin/pgbouncer --version 2>/dev/null) | head -1); $( /usr/sbin/pgpool --version 2>&1 | head -1)."
  echo
  echo "pgbench: workloads \`$WORKLOADS\`, protocols \`$PROTOCOLS\`, clients \`$CLIENTS\`, $DURATION s per cell, -j $JOBS, REPEAT=$REPEAT, ROUNDS=$ROUNDS, ORDER=$ORDER, WARMUP=$WARMUP s; targets: $TARGETS."
  echo
  echo "| target | setup |"
  echo "|---|---|"
  echo "| direct | PostgreSQL 15 primary 127.0.0.1:$PRIMARY_PORT (no proxy) |"
  echo "| pglifeguard | 127.0.0.1:$PGLIFEGUARD_PORT, session pooling, pool_size $PGLIFEGUARD_POOL_SIZE, trust, 3 backends (primary found by health_check), worker_threads $PGLIFEGUARD_WORKERS |"
  echo "| pgbouncer-session | 127.0.0.1:$PGBOUNCER_PORT, pool_mode session, default_pool_size ${POOL_SIZE:-20} (pgbouncer.sh) |"
  case " $TARGETS " in *" pglifeguard-b "*) echo "| pglifeguard-b | a second pglifeguard as above, on 127.0.0.1:$PGLIFEGUARD_B_PORT |" ;; esac
  case " $TARGETS " in *" pgbouncer-b "*) echo "| pgbouncer-session-b | a second PgBouncer as above, on 127.0.0.1:$PGBOUNCER_B_PORT |" ;; esac
  echo "| pgpool-lb_off | 127.0.0.1:$PGPOOL_PORT, streaming replication mode, load_balance_mode off, num_init_children ${NUM_INIT_CHILDREN:-64}, max_pool ${MAX_POOL:-4}, health check timeout $HC_TIMEOUT s / $HC_RETRIES retries (pgpool.sh) |"
  echo
  echo "The machine is shared: compare ratios within this run only, not absolute TPS across runs."
  echo
} > "$RUN_DIR/baseline-head.md"

# ---- cluster sanity: a target that triggered a failover has measured a different cluster ----
notes=$RUN_DIR/baseline-extra.md   # report.py appends it to the report
in_recovery() { "$PGBIN/psql" -X -q -A -t -h 127.0.0.1 -p "$1" -U postgres -d postgres -c 'select pg_is_in_recovery()' 2>/dev/null; }
cluster_intact() {
  [ "$(in_recovery "$PRIMARY_PORT")" = f ] || return 1
  local p; for p in $STANDBY_PORTS; do [ "$(in_recovery "$p")" = t ] || return 1; done
}
# Marks rows of target $1 finished at or after time $2 (YYYY-mm-dd HH:MM:SS) as invalid.
invalidate_rows() {
  local tmp=$RESULTS.tmp
  awk -F'\t' -v OFS='\t' -v t="$1" -v since="$2" -v why="$3" \
    'NR > 1 && $2 == t && $1 >= since { $20 = "invalid: " why } { print }' "$RESULTS" > "$tmp" && mv "$tmp" "$RESULTS"
}
check_cluster_after() { # $1 = target, $2 = bench.sh name, $3 = time the target started
  cluster_intact && return 0
  local since=$3 why="cluster changed (standby promoted)"
  if [ "$1" = pgpool ] && [ -f "$BL/pgpool/pgpool.log" ]; then
    local d; d=$(tail -n +"$((PGPOOL_LOG_LINES + 1))" "$BL/pgpool/pgpool.log" | grep -m1 'starting degeneration' | cut -c1-19)
    [ -n "$d" ] && { since=$d; why="pgpool-II failed over at $d"; }
  fi
  say "WARNING: after target $1 the cluster is no longer primary pg0 + 2 standbys ($why); repairing with cluster.sh up"
  invalidate_rows "$2" "$since" "$why"
  echo "- **$2**: $why; its cells that ended after $since ran against a different cluster and are shown as FAILED." >> "$notes"
  "$SHARED_BENCH/cluster.sh" up || die "cluster.sh up could not repair the cluster"
  return 1
}

# ---- targets ----
failed=0
PGPOOL_LOG_LINES=0
declare -A T_NAME T_PORT T_PID T_LABEL T_SINCE

start_target() { # $1 = target word; records its table name, port, PID and label
  local t=$1
  T_SINCE[$t]=$(date '+%Y-%m-%d %H:%M:%S')
  case "$t" in
    direct)
      T_NAME[$t]=direct T_PORT[$t]=$PRIMARY_PORT T_PID[$t]=- T_LABEL[$t]="no proxy" ;;
    pglifeguard)
      start_pglifeguard "$RUN_DIR" || { say "target pglifeguard failed to start"; return 1; }
      T_NAME[$t]=pglifeguard T_PORT[$t]=$PGLIFEGUARD_PORT T_PID[$t]=$LG_PID
      T_LABEL[$t]="session pool_size=$PGLIFEGUARD_POOL_SIZE $git_rev" ;;
    pglifeguard-b)
      start_pglifeguard_b || { say "target pglifeguard-b failed to start"; return 1; }
      T_NAME[$t]=pglifeguard-b T_PORT[$t]=$PGLIFEGUARD_B_PORT T_PID[$t]=$LG_B_PID
      T_LABEL[$t]="second copy, session pool_size=$PGLIFEGUARD_POOL_SIZE" ;;
    pgbouncer-b)
      start_pgbouncer_b || { say "target pgbouncer-b failed to start"; return 1; }
      T_NAME[$t]=pgbouncer-session-b T_PORT[$t]=$PGBOUNCER_B_PORT T_PID[$t]=$PB_B_PID
      T_LABEL[$t]="second copy, session default_pool_size=${POOL_SIZE:-20}" ;;
    pgbouncer)
      "$SHARED_BENCH/pgbouncer.sh" up session || { say "pgbouncer.sh up session failed"; return 1; }
      T_NAME[$t]=pgbouncer-session T_PORT[$t]=$PGBOUNCER_PORT T_PID[$t]=$(cat "$BL/pgbouncer/pgbouncer.pid")
      T_LABEL[$t]="session default_pool_size=${POOL_SIZE:-20}" ;;
    pgpool)
      PGPOOL_LOG_LINES=$(cat "$BL/pgpool/pgpool.log" 2>/dev/null | wc -l)
      "$SHARED_BENCH/pgpool.sh" up lb_off || { say "pgpool.sh up lb_off failed"; return 1; }
      T_NAME[$t]=pgpool-lb_off T_PORT[$t]=$PGPOOL_PORT T_PID[$t]=$(tr -dc '0-9' < "$BL/pgpool/pgpool.pid")
      T_LABEL[$t]="lb_off num_init_children=${NUM_INIT_CHILDREN:-64}" ;;
  esac
}

stop_target() { # $1 = target word
  case "$1" in
    pglifeguard) stop_pglifeguard ;;
    pglifeguard-b) stop_pglifeguard_b ;;
    pgbouncer) "$SHARED_BENCH/pgbouncer.sh" down ;;
    pgbouncer-b) stop_pgbouncer_b ;;
    pgpool) "$SHARED_BENCH/pgpool.sh" down ;;
  esac
}

# Runs bench.sh against a started target for the cells in CLIENTS/PROTOCOLS/WORKLOADS, then
# checks the cluster. Returns non-zero if a cell failed or the cluster changed under it.
bench_target() { # $1 = target word
  local t=$1 rc=0
  "$SHARED_BENCH/bench.sh" "${T_NAME[$t]}" "${T_PORT[$t]}" "${T_PID[$t]}" "${T_LABEL[$t]}" || rc=$?
  [ "$rc" = 0 ] || say "target $t: bench.sh exit status $rc (see the status column)"
  if ! check_cluster_after "$t" "${T_NAME[$t]}" "${T_SINCE[$t]}"; then
    # The target may have acted on the failover (pgpool-II marks pg0 down): start it afresh
    # against the repaired cluster.
    stop_target "$t"; start_target "$t" || return 1
    return 1
  fi
  return "$rc"
}

case "$ORDER" in
  target)
    # Each target runs the whole matrix, started before and stopped after it.
    for round in $(seq "$ROUNDS"); do
      [ "$ROUNDS" = 1 ] || say "=== round $round of $ROUNDS ==="
      for t in $TARGETS; do
        say "=== target $t ==="
        start_target "$t" || { failed=1; continue; }
        bench_target "$t" || failed=1
        stop_target "$t"
      done
    done ;;
  cell)
    # Every target stays up; each cell is run by every target in turn, back to back, so drift
    # of a shared machine hits every target alike and each pool is measured warm. The order
    # of a round follows a Williams design: over n rounds (2n for an odd number of targets)
    # every target runs in every position once and right after every other target once.
    # Whatever a run leaves behind on the cluster (exiting backends, autovacuum) then delays
    # no target more than another.
    up=()
    for t in $TARGETS; do
      if start_target "$t"; then up+=("$t"); else failed=1; fi
    done
    n=${#up[@]}
    base=()   # 0, 1, n-1, 2, n-2, ...
    for i in $(seq 0 $((n - 1))); do
      if [ "$i" = 0 ]; then base+=(0); elif [ $((i % 2)) = 1 ]; then base+=($(( (i + 1) / 2 ))); else base+=($(( n - i / 2 ))); fi
    done
    order_of_round() { # $1 = round (1-based); prints the targets of that round in order
      local r=$(( ($1 - 1) % (n % 2 == 0 ? n : 2 * n) )) k idx out=()
      for k in $(seq 0 $((n - 1))); do
        if [ "$r" -lt "$n" ]; then idx=$(( (base[k] + r) % n )); else idx=$(( (base[n - 1 - k] + r - n) % n )); fi
        out+=("${up[$idx]}")
      done
      echo "${out[@]}"
    }
    cell=0
    for wl in $WORKLOADS; do
      for proto in $PROTOCOLS; do
        for c in $CLIENTS; do
          if [ "$WARMUP" != 0 ]; then
            say "=== $wl $proto -c $c, warm-up of $WARMUP s per target (not recorded) ==="
            for t in "${up[@]}"; do
              CLIENTS=$c PROTOCOLS=$proto WORKLOADS=$wl DURATION=$WARMUP RESULTS=$RUN_DIR/warmup.tsv \
                RAWDIR=$RUN_DIR/warmup-raw bench_target "$t" || failed=1
            done
          fi
          # Each cell starts the design at its own round, so no target is always first.
          for round in $(seq "$ROUNDS"); do
            say "=== $wl $proto -c $c, round $round of $ROUNDS ==="
            for t in $(order_of_round $((round + cell))); do
              CLIENTS=$c PROTOCOLS=$proto WORKLOADS=$wl bench_target "$t" || failed=1
            done
          done
          cell=$((cell + 1))
        done
      done
    done
    for t in "${up[@]}"; do stop_target "$t"; done ;;
esac

python3 "$SHARED_BENCH/report.py" "$RESULTS" "$REPORT" || die "report.py failed"
# Sample by sample: pglifeguard against PgBouncer, and each control against its original.
paired_section() { # $1, $2 = target words, $3 = heading
  [[ " $TARGETS " == *" $1 "* && " $TARGETS " == *" $2 "* ]] || return 0
  { echo; echo "### $3, sample by sample"; echo
    python3 "$REPO/benches/paired.py" "$RESULTS" "${T_NAME[$1]:-$1}" "${T_NAME[$2]:-$2}"; } >> "$REPORT" || say "paired.py failed"
}
paired_section pglifeguard pgbouncer "pglifeguard against PgBouncer"
paired_section pgbouncer-b pgbouncer "A second PgBouncer against the first (control)"
paired_section pglifeguard-b pglifeguard "A second pglifeguard against the first (control)"
say "report: $REPORT"
cat "$REPORT"
exit "$failed"
