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
# Every cargo build runs under flock /tmp/pgseal-build.lock, unless an ancestor of
# this process already holds that lock (e.g. `flock -o /tmp/pgseal-build.lock cargo
# test ...` runs the test that calls this script): taking it again would deadlock.
set -euo pipefail
version=${1:?usage: release_build.sh VERSION}
repo=$(cd "$(dirname "$0")/.." && pwd)
releases="$repo/extension/sql/RELEASES"
cache=${PGSEAL_RELEASE_CACHE:-/var/cache/pgseal}
pg_config=/usr/lib/postgresql/15/bin/pg_config
lock=/tmp/pgseal-build.lock
log() { echo "release_build: $*" >&2; }

read -r commit sha < <(awk -v v="$version" '$1 == v { print $2, $3 }' "$releases") || true
if [ -z "${commit:-}" ] || [ -z "${sha:-}" ]; then
    log "version $version is not in $releases"; exit 2
fi
out="$cache/release-$version-${commit:0:12}"
if [ -f "$out/ok" ]; then
    # A cached build is used only if its script still has the released hash.
    got=$(sha256sum "$out/extension/pgseal--$version.sql" | cut -d' ' -f1)
    if [ "$got" = "$sha" ]; then
        log "cached: $out"
        echo "$out"; exit 0
    fi
    log "cached build in $out has a script with sha256 $got, not $sha; rebuilding"
    rm -rf "$out"
fi

if ! git -C "$repo" cat-file -e "$commit^{commit}" 2>/dev/null; then
    log "commit $commit of $version is not in $repo's history (a shallow clone?)"; exit 2
fi

# Whether a process among our ancestors holds the build lock (see above).
ancestor_holds_lock() {
    [ -e "$lock" ] || return 1
    local ino holders p
    ino=$(stat -c %i "$lock")
    holders=$(awk -v ino="$ino" '$2 == "FLOCK" { n = split($6, a, ":"); if (a[n] == ino) print $5 }' /proc/locks)
    [ -n "$holders" ] || return 1
    p=$$
    while [ -n "$p" ] && [ "$p" -gt 1 ]; do
        if grep -qx "$p" <<<"$holders"; then return 0; fi
        p=$(awk '/^PPid:/ { print $2 }' "/proc/$p/status" 2>/dev/null || true)
    done
    return 1
}
locked() {
    if ancestor_holds_lock; then "$@"; else flock -o "$lock" "$@"; fi
}

start=$(date +%s)
mkdir -p "$cache"
src=$(mktemp -d "/var/tmp/pgseal-release-$version.XXXXXX")
stage="$out.tmp.$$"
trap 'rm -rf "$src" "$stage"' EXIT
log "building $version from $commit in $src (cargo target $cache/target)"
git -C "$repo" archive --format=tar "$commit" | tar -x -C "$src"

# The environment of a `cargo test` that runs this script describes that test's
# crate; the release's build must not see it.
for v in $(env | sed -n 's/^\(CARGO_[A-Z0-9_]*\)=.*/\1/p'); do
    case "$v" in CARGO_HOME) ;; *) unset "$v" ;; esac
done
export CARGO_TARGET_DIR="$cache/target"
(cd "$src/extension" && locked cargo pgrx package --debug --pg-config "$pg_config" \
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
echo "$version $commit $(date -u +%FT%TZ) $(( $(date +%s) - start ))s" > "$stage/ok"
rm -rf "$out"
mv "$stage" "$out"
log "built $version in $(( $(date +%s) - start ))s: $out"
echo "$out"
