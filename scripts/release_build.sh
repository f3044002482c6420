#!/usr/bin/env bash
# Builds a released pgseal version's extension files from the git history, once,
# into a cache that later runs reuse:
#   release_build.sh VERSION        prints the cache directory on its last line:
#     DIR/lib/pgseal.so
#     DIR/extension/pgseal.control
#     DIR/extension/pgseal--VERSION.sql
# The commit comes from extension/sql/RELEASES; the install script the build
# generates must have the sha256 RELEASES gives (and so equal the frozen
# extension/sql/pgseal--VERSION.sql), or the script fails. PostgreSQL 15 only (the
# one version every release so far was built for), debug build: the files are for
# the upgrade test, not for users.
#
# Environment: PGSEAL_RELEASE_CACHE (default /var/cache/pgseal) holds the results and
# a cargo target directory shared by every release build, so a second release reuses
# the compiled dependencies. Works from a fresh clone (needs the full history).
#
# It runs as root (CI does), so nothing it builds with may come from a place another
# user can write: the sources are unpacked inside the cache, which must be owned by
# root and writable by no one else (cargo and rustup read configuration from every
# parent of the directory they run in, such as a planted /var/tmp/.cargo/config.toml),
# the toolchain is named explicitly, and a cached library is used only if its
# sha256 is the one recorded when it was built.
set -euo pipefail
version=${1:?usage: release_build.sh VERSION}
repo=$(cd "$(dirname "$0")/.." && pwd)
releases="$repo/extension/sql/RELEASES"
cache=${PGSEAL_RELEASE_CACHE:-/var/cache/pgseal}
pg_config=/usr/lib/postgresql/15/bin/pg_config
log() { echo "release_build: $*" >&2; }

# The cache and every directory above it: owned by root (or by us) and not writable
# by group or others, or a local user could plant configuration cargo would obey.
mkdir -p -m 700 "$cache"
d=$(cd "$cache" && pwd -P)
while :; do
    read -r owner mode < <(stat -c '%u %a' "$d")
    if { [ "$owner" != 0 ] && [ "$owner" != "$(id -u)" ]; } || (( 8#$mode & 8#022 )); then
        log "$d is owned by uid $owner with mode $mode; the release cache must lie under directories only root can write"
        exit 2
    fi
    [ "$d" = / ] && break
    d=$(dirname "$d")
done

read -r commit sha < <(awk -v v="$version" '$1 == v { print $2, $3 }' "$releases") || true
if [ -z "${commit:-}" ] || [ -z "${sha:-}" ]; then
    log "version $version is not in $releases"; exit 2
fi
out="$cache/release-$version-${commit:0:12}"
if [ -f "$out/ok" ]; then
    # A cached build is used only if its script still has the released hash and its
    # library the hash recorded when it was built.
    got=$(sha256sum "$out/extension/pgseal--$version.sql" | cut -d' ' -f1)
    so_got=$(sha256sum "$out/lib/pgseal.so" | cut -d' ' -f1)
    so_want=$(awk '$1 == "so" { print $2 }' "$out/ok")
    if [ "$got" = "$sha" ] && [ -n "$so_want" ] && [ "$so_got" = "$so_want" ]; then
        log "cached: $out"
        echo "$out"; exit 0
    fi
    log "cached build in $out does not match its recorded hashes; rebuilding"
    rm -rf "$out"
fi

if ! git -C "$repo" cat-file -e "$commit^{commit}" 2>/dev/null; then
    log "commit $commit of $version is not in $repo's history (a shallow clone?)"; exit 2
fi

start=$(date +%s)
mkdir -p "$cache"
src=$(mktemp -d "$cache/build-$version.XXXXXX")
stage="$out.tmp.$$"
trap 'rm -rf "$src" "$stage"' EXIT
log "building $version from $commit in $src (cargo target $cache/target)"
git -C "$repo" archive --format=tar "$commit" | tar -x -C "$src"

# The environment of a `cargo test` that runs this script describes that test's
# crate; the release's build must not see it (cargo's own settings stay).
for v in $(env | sed -n 's/^\(CARGO_[A-Z0-9_]*\)=.*/\1/p'); do
    case "$v" in
    CARGO_PKG_* | CARGO_MANIFEST_* | CARGO_CRATE_* | CARGO_BIN_* | CARGO_PRIMARY_PACKAGE | CARGO_TARGET_TMPDIR) unset "$v" ;;
    esac
done
unset CARGO
export CARGO_TARGET_DIR="$cache/target"
RUSTUP_TOOLCHAIN=$(rustup show active-toolchain | cut -d' ' -f1)
export RUSTUP_TOOLCHAIN
(cd "$src/extension" && cargo pgrx package --debug --pg-config "$pg_config" \
    --out-dir "$src/package" >&2)

so=$(find "$src/package" -name pgseal.so -print -quit)
extdir=$(dirname "$(find "$src/package" -name pgseal.control -print -quit)")
script="$extdir/pgseal--$version.sql"
if [ -z "$so" ] || [ ! -f "$script" ]; then
    log "the package in $src/package lacks pgseal.so or pgseal--$version.sql"; exit 1
fi
got=$(sha256sum "$script" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
    log "$version's generated install script has sha256 $got; RELEASES says $sha"
    exit 1
fi
mkdir -p "$stage/lib" "$stage/extension"
cp "$so" "$stage/lib/pgseal.so"
cp "$extdir/pgseal.control" "$extdir/pgseal--$version.sql" "$stage/extension/"
{
    echo "release $version $commit $(date -u +%FT%TZ) $(( $(date +%s) - start ))s"
    echo "so $(sha256sum "$stage/lib/pgseal.so" | cut -d' ' -f1)"
} > "$stage/ok"
rm -rf "$out"
mv "$stage" "$out"
log "built $version in $(( $(date +%s) - start ))s: $out"
echo "$out"
