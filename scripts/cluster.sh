#!/usr/bin/env bash
# A throwaway PostgreSQL cluster (version PGSEAL_PG: 15 or 18, see pg.sh) with pgseal preloaded, owned by an unprivileged user.
#   cluster.sh start DIR PORT KEYFILE [extra postgresql.conf lines...]
#   cluster.sh stop DIR
#   cluster.sh restart DIR
#   cluster.sh crash DIR        (kill -9 of the postmaster, as after a power cut)
#   cluster.sh resume DIR       (start an existing cluster again, e.g. after crash)
# KEYFILE holds '<version>:<64 hex>' lines; the server reads it through
# pgseal.master_key_command. KEYFILE may instead be the literal env:<64 hex>: the
# postmaster then gets the key in PGSEAL_MASTER_KEY and no key command (a later
# restart or resume passes only the caller's environment).
# DIR must lie outside the root-owned checkout.
set -euo pipefail
. "$(dirname "$0")/pg.sh"
# PGSEAL_PG_BINDIR runs another installation's programs instead (a private copy
# that a test installs an older release or a package into).
BIN=${PGSEAL_PG_BINDIR:-$(pg_bindir_of "$PGSEAL_PG")}
USER_=${PGSEAL_TEST_USER:-pgseal-test}
# The servers never inherit RUST_BACKTRACE: with it, pgrx would put a Rust backtrace
# into the DETAIL of errors raised from Rust, which clients see.
as_user() { runuser -u "$USER_" -- env -u RUST_BACKTRACE "$@"; }

cmd=$1; dir=$2
case "$cmd" in
start)
    port=$3; keyfile=$4; shift 4
    envkey=
    rm -rf "$dir"; install -d -o "$USER_" -m 700 "$dir"
    if [[ $keyfile == env:* ]]; then
        envkey=${keyfile#env:}
    else
        install -o "$USER_" -m 600 "$keyfile" "$dir/master.keys"
    fi
    as_user "$BIN/initdb" -D "$dir/data" -A trust -U postgres --no-sync >/dev/null
    {
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$dir'"
        echo "shared_preload_libraries = 'pgseal'"
        if [ -z "$envkey" ]; then echo "pgseal.master_key_command = 'cat $dir/master.keys'"; fi
        echo "fsync = off"
        echo "logging_collector = off"
        for line in "$@"; do echo "$line"; done
    } >> "$dir/data/postgresql.conf"
    if [ -n "$envkey" ]; then export PGSEAL_MASTER_KEY="$envkey"; fi  # runuser keeps the environment
    as_user "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
    ;;
stop)
    [ -d "$dir/data" ] && as_user "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    ;;
restart)
    as_user "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w -t 60 restart >/dev/null
    ;;
crash)
    kill -9 "$(head -1 "$dir/data/postmaster.pid")"
    ;;
resume)
    # Orphaned backends notice the postmaster's death and exit; until they have,
    # the old shared memory is still attached and a new postmaster refuses to start.
    for _ in $(seq 1 60); do
        as_user "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null 2>&1 && exit 0
        sleep 0.5
    done
    echo "cluster in $dir did not start again; see $dir/server.log" >&2; exit 1
    ;;
*) echo "usage: $0 start|stop|restart|crash|resume DIR ..." >&2; exit 2 ;;
esac
