#!/usr/bin/env bash
# Citus for pgseal's scale-out tier (PostgreSQL 18 only: Citus 14 supports 16-18).
#   citus.sh tarball   prints the vendored source's path, or exits 3 when it is absent
#   citus.sh build     builds Citus once into a cache outside the source tree (keyed by
#                      version and by the PostgreSQL it was built against) and installs it
#                      into PostgreSQL 18's directories; a cached build installs in seconds
# The source is the release tag's tree, vendored outside this repository (Citus is
# AGPL-3.0: a test dependency, never part of pgseal). PGSEAL_CITUS_TARBALL overrides
# where to look for it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/pg.sh"
CITUS_VERSION=14.0.1
CITUS_CACHE=${PGSEAL_CITUS_CACHE:-/opt/pgseal-citus}
PG_CONFIG=$(pg_config_of 18)

log() { printf '[citus] %s\n' "$*" >&2; }

tarball() {
    local c
    for c in "${PGSEAL_CITUS_TARBALL:-}" \
        "$here/../../shared/vendor/citus-$CITUS_VERSION.tar.gz" \
        "$here/../../../shared/vendor/citus-$CITUS_VERSION.tar.gz" \
        "/work/shared/vendor/citus-$CITUS_VERSION.tar.gz"; do
        if [ -n "$c" ] && [ -f "$c" ]; then
            echo "$c"
            return 0
        fi
    done
    return 3
}

build() {
    local src pgv key dir stage
    src=$(tarball) || { log "no vendored source citus-$CITUS_VERSION.tar.gz"; exit 3; }
    [ -x "$PG_CONFIG" ] || { log "PostgreSQL 18 is not set up (run scripts/setup.sh)"; exit 2; }
    pgv=$("$PG_CONFIG" --version | awk '{print $2}')
    # The cache is keyed by what the build depends on: Citus's version and tarball, and
    # the PostgreSQL it compiles against (its version and where it is installed).
    key=$( (sha256sum "$src" | cut -c1-16; echo "$pgv"; "$PG_CONFIG" --pkglibdir) | sha256sum | cut -c1-12)
    dir="$CITUS_CACHE/$CITUS_VERSION-pg$pgv-$key"
    stage="$dir/stage"
    if [ ! -f "$dir/built" ]; then
        log "building Citus $CITUS_VERSION against PostgreSQL $pgv into $dir (about 15 minutes, once)"
        rm -rf "$dir"
        mkdir -p "$dir/src"
        tar -xzf "$src" -C "$dir/src" --strip-components=1
        (
            cd "$dir/src"
            ./configure -q PG_CONFIG="$PG_CONFIG" --without-libcurl --without-lz4 --without-zstd >"$dir/configure.log" 2>&1
            # The wheel's pg_config names -Wmissing-variable-declarations, which Debian 12's
            # GCC rejects; these are its other flags.
            make -s -j"$(nproc)" CFLAGS='-Wall -O2 -fno-strict-aliasing -fwrapv -fexcess-precision=standard' >"$dir/make.log" 2>&1
            make -s install DESTDIR="$stage" >"$dir/install.log" 2>&1
        ) || { log "build failed; logs in $dir"; exit 1; }
        rm -rf "$dir/src"
        touch "$dir/built"
    fi
    # Install (again, cheaply) into PostgreSQL 18's directories: setup.sh may have
    # unpacked a fresh PostgreSQL 18 since the build.
    cp -a "$stage/." /
    chmod -R a+rX "$("$PG_CONFIG" --pkglibdir)" "$("$PG_CONFIG" --sharedir)/extension"
    log "Citus $CITUS_VERSION installed for PostgreSQL $pgv"
}

case "${1:-}" in
tarball) tarball ;;
build) build ;;
*) echo "usage: $0 tarball|build" >&2; exit 2 ;;
esac
