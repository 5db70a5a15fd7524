#!/bin/sh
# follow_primary_command for pglifeguard: point a standby at the new primary after a failover.
# Same arguments as a pgpool-II follow_primary.sh:
#
#   follow_primary_command: "/etc/pglifeguard/hooks/follow_primary.sh %d %h %p %D %m %H %M %P %r %R"
#
#   $1 %d standby id   $2 %h its host   $3 %p its port   $4 %D its data dir
#   $5 %m new primary id   $6 %H its host   $7 %M old main id   $8 %P old primary id
#   $9 %r new primary port   $10 %R new primary data dir
#
# A node that is still a primary (the old primary after `pglifeguard ctl switchover`) is
# stopped, rewound onto the new primary's timeline with pg_rewind (needs wal_log_hints = on
# or data checksums) and started as a standby.
# Otherwise, first choice: rewrite primary_conninfo and reload (PostgreSQL 13+ applies it without a
# restart; with recovery_target_timeline = 'latest', the default, the standby follows the
# promoted node's new timeline). If the standby is not streaming from the new primary within
# $FOLLOW_WAIT seconds (it replayed WAL the new primary never had), it is rebuilt from the new
# primary with pg_basebackup, as pgpool's pcp_recovery_node would. Set REBUILD=never to skip.
set -eu
ID=$1; HOST=$2; PORT=$3; DATA=$4; NEW_HOST=$6; NEW_PORT=$9
PG_BIN=${PG_BIN:-$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)}
REPL_USER=${REPL_USER:-postgres}
FOLLOW_WAIT=${FOLLOW_WAIT:-10}
REBUILD=${REBUILD:-auto}
SSH_USER=${SSH_USER:-postgres}

as_postgres() {
    case "$HOST" in
        127.*|localhost|::1|"$(hostname)")
            if [ "$(id -u)" = 0 ]; then runuser -u postgres -- sh -c "$1"; else sh -c "$1"; fi ;;
        *) ssh -T -o BatchMode=yes -o ConnectTimeout=5 "$SSH_USER@$HOST" "$1" ;;
    esac
}

conninfo="host=$NEW_HOST port=$NEW_PORT user=$REPL_USER application_name=node$ID"
role=$("$PG_BIN/psql" -X -A -t -h "$HOST" -p "$PORT" -U "$REPL_USER" -d postgres -c "select pg_is_in_recovery()" 2>/dev/null || true)
if [ "$role" = f ]; then
    echo "node $ID is still a primary: stopping it and rewinding it onto $NEW_HOST:$NEW_PORT"
    # A just-promoted server records its new timeline in pg_control only at its next
    # checkpoint; pg_rewind reads it from there.
    "$PG_BIN/psql" -X -q -h "$NEW_HOST" -p "$NEW_PORT" -U "$REPL_USER" -d postgres -c checkpoint
    # pg_rewind copies the source's configuration files; this node keeps its own.
    as_postgres "'$PG_BIN/pg_ctl' stop -m fast -w -D '$DATA' && cp '$DATA/postgresql.conf' '$DATA.conf.keep' && \
      '$PG_BIN/pg_rewind' -D '$DATA' --source-server='host=$NEW_HOST port=$NEW_PORT user=$REPL_USER dbname=postgres' && \
      mv '$DATA.conf.keep' '$DATA/postgresql.conf' && touch '$DATA/standby.signal' && \
      echo \"primary_conninfo = '$conninfo'\" >> '$DATA/postgresql.auto.conf' && \
      '$PG_BIN/pg_ctl' start -w -D '$DATA' -l '$DATA/follow_primary.log'" || echo "pg_rewind path failed" >&2
else
    as_postgres "echo \"primary_conninfo = '$conninfo'\" >> '$DATA/postgresql.auto.conf' && '$PG_BIN/pg_ctl' reload -D '$DATA'"
fi

i=0
while [ "$i" -lt "$((FOLLOW_WAIT * 5))" ]; do
    state=$("$PG_BIN/psql" -X -A -t -h "$NEW_HOST" -p "$NEW_PORT" -U "$REPL_USER" -d postgres \
        -c "select state from pg_stat_replication where application_name = 'node$ID'" 2>/dev/null || true)
    if [ "$state" = streaming ]; then
        echo "node $ID streams from $NEW_HOST:$NEW_PORT"
        exit 0
    fi
    i=$((i + 1)); sleep 0.2
done

if [ "$REBUILD" = never ]; then
    echo "node $ID does not stream from the new primary and REBUILD=never" >&2
    exit 1
fi
echo "node $ID does not stream from the new primary; rebuilding it with pg_basebackup"
as_postgres "'$PG_BIN/pg_ctl' stop -m fast -w -D '$DATA' || true; rm -rf '$DATA'.old; mv '$DATA' '$DATA'.old && \
  '$PG_BIN/pg_basebackup' -h $NEW_HOST -p $NEW_PORT -U $REPL_USER -D '$DATA' -R -X stream && \
  cp '$DATA'.old/postgresql.conf '$DATA'/ 2>/dev/null; echo \"primary_conninfo = '$conninfo'\" >> '$DATA/postgresql.auto.conf' && \
  '$PG_BIN/pg_ctl' start -w -D '$DATA' -l '$DATA/../node$ID-rebuilt.log' && rm -rf '$DATA'.old"
echo "node $ID rebuilt from $NEW_HOST:$NEW_PORT"
