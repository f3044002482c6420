#!/bin/sh
# Installs pgseal from this directory into the PostgreSQL that a pg_config reports:
#   ./install.sh [PG_CONFIG]        (default: pg_config on PATH)
#   ./install.sh --uninstall [PG_CONFIG]
# lib/ goes to `pg_config --pkglibdir`, share/extension/ to `pg_config --sharedir`/extension.
# Run it as the user that owns those directories (usually root).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
mode=install
if [ "${1:-}" = "--uninstall" ]; then mode=uninstall; shift; fi
if [ "$#" -gt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "usage: $0 [--uninstall] [PG_CONFIG]" >&2; exit 2
fi
pg_config=${1:-pg_config}
if ! command -v "$pg_config" >/dev/null 2>&1; then
    echo "install.sh: no pg_config at '$pg_config'; pass the path of the target PostgreSQL's pg_config" >&2
    exit 2
fi

want_major=$(cat "$here/PG_MAJOR")
have=$("$pg_config" --version)            # e.g. "PostgreSQL 18.6"
have_major=$(echo "$have" | sed -n 's/^PostgreSQL \([0-9][0-9]*\).*/\1/p')
if [ "$have_major" != "$want_major" ]; then
    echo "install.sh: this build is for PostgreSQL $want_major; $pg_config reports '$have'" >&2
    exit 2
fi

pkglibdir=$("$pg_config" --pkglibdir)
extdir=$("$pg_config" --sharedir)/extension
for d in "$pkglibdir" "$extdir"; do
    if [ ! -d "$d" ]; then echo "install.sh: $d does not exist" >&2; exit 2; fi
done

if [ "$mode" = uninstall ]; then
    for f in "$here"/lib/*; do rm -f "$pkglibdir/$(basename "$f")"; done
    for f in "$here"/share/extension/*; do rm -f "$extdir/$(basename "$f")"; done
    echo "removed pgseal from $pkglibdir and $extdir"
    exit 0
fi

for f in "$here"/lib/*; do
    install -m 0755 "$f" "$pkglibdir/"
done
for f in "$here"/share/extension/*; do
    install -m 0644 "$f" "$extdir/"
done
echo "installed $(ls "$here/lib" | tr '\n' ' ')into $pkglibdir"
echo "installed $(ls "$here/share/extension" | tr '\n' ' ')into $extdir"
echo "next: shared_preload_libraries = 'pgseal' and pgseal.master_key_command in postgresql.conf, restart, then CREATE EXTENSION pgseal;"
