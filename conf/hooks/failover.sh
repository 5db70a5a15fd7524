#!/bin/sh
# failover_command for pglifeguard: promote the chosen standby when the primary fails.
# Same job and same arguments as a pgpool-II failover.sh, so an existing setup carries over:
#
#   failover_command: "/etc/pglifeguard/hooks/failover.sh %d %h %p %D %m %H %M %P %r %R %N %S"
#
#   $1 %d failed node id        $2 %h failed host     $3 %p failed port   $4 %D failed data dir
#   $5 %m node to promote       $6 %H its host        $7 %M old main id   $8 %P old primary id
#   $9 %r its port             $10 %R its data dir   $11 %N old primary host  $12 %S old primary port
#
# Servers on this host are promoted with pg_ctl (as the postgres OS user when run as root);
# others over ssh as $SSH_USER (default postgres), as pgpool's sample does.
# Exit status 0 means the promotion was started; pglifeguard then waits for the node to report
# it is primary before routing writes to it.
set -eu
FAILED_ID=$1; NEW_ID=$5; NEW_HOST=$6; OLD_PRIMARY_ID=$8; NEW_DATA=${10}
PG_BIN=${PG_BIN:-$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)}
SSH_USER=${SSH_USER:-postgres}

if [ "$FAILED_ID" != "$OLD_PRIMARY_ID" ]; then
    echo "node $FAILED_ID was a standby; nothing to promote"
    exit 0
fi
if [ "$NEW_ID" = "-1" ]; then
    echo "no standby left to promote" >&2
    exit 1
fi

promote="$PG_BIN/pg_ctl promote -w -t 60 -D $NEW_DATA"
case "$NEW_HOST" in
    127.*|localhost|::1|"$(hostname)")
        if [ "$(id -u)" = 0 ]; then
            runuser -u postgres -- $promote
        else
            $promote
        fi ;;
    *)
        ssh -T -o BatchMode=yes -o ConnectTimeout=5 "$SSH_USER@$NEW_HOST" "$promote" ;;
esac
echo "promoted node $NEW_ID ($NEW_HOST, $NEW_DATA)"
