#!/usr/bin/env bash
# `make package`: release builds of pgseal, packaged into target/package/:
#   postgresql-15-pgseal_<ver>_<arch>.deb   the extension in Debian's PostgreSQL 15 layout
#   pgseald_<ver>_<arch>.deb                 the daemon, its example config, systemd unit, user
#   pgseal-<ver>-pg18-<machine>-linux.tar.gz the extension for PostgreSQL 18 (pg_config layout)
#   META.json                                PGXN metadata (its version must equal Cargo's)
#   SHA256SUMS
# <ver> is the workspace version in Cargo.toml. Templates and maintainer scripts are in
# packaging/. Intermediate trees go to target/package-build/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
. scripts/pg.sh
umask 022

OUT=$ROOT/target/package
WORK=$ROOT/target/package-build
PY=/usr/bin/python3
EXT_PG=15              # the Debian package's PostgreSQL
TAR_PG=18              # the tarball's PostgreSQL
MAINTAINER="pgseal maintainers <maintainers@users.noreply.b-seed-7cc0f131.example>"

log() { printf '[package] %s\n' "$*"; }
die() { printf '[package] FAIL: %s\n' "$*" >&2; exit 1; }
t_start=$SECONDS

# dpkg-shlibdeps (dpkg-dev), strip and objdump (binutils) come from setup.sh.
for tool in dpkg-shlibdeps dpkg-deb strip objdump; do
    command -v "$tool" >/dev/null || die "$tool is missing; run scripts/setup.sh"
done
step() { log "$1 ($((SECONDS - t_start)) s so far)"; }

# ---- version: Cargo's, and META.json must agree ------------------------------------
read -r VERSION TARGET_DIR < <(cargo metadata --no-deps --format-version 1 | "$PY" -c '
import json, sys
meta = json.load(sys.stdin)
pk = {p["name"]: p["version"] for p in meta["packages"]}
vs = {pk[n] for n in ("pgseal", "pgseald", "pgseal-core")}
if len(vs) != 1:
    sys.exit("crate versions differ: %r" % pk)
print(vs.pop(), meta["target_directory"])') || true
[ -n "${VERSION:-}" ] && [ -n "${TARGET_DIR:-}" ] || die "could not read the version from Cargo.toml (cargo metadata)"
"$PY" - "$ROOT/META.json" "$VERSION" <<'PYEOF' || die "META.json does not match Cargo.toml (version $VERSION); update META.json"
import json, sys
meta = json.load(open(sys.argv[1]))
v = sys.argv[2]
bad = []
if meta.get("version") != v:
    bad.append("version is %r" % meta.get("version"))
if meta.get("provides", {}).get("pgseal", {}).get("version") != v:
    bad.append("provides.pgseal.version is %r" % meta.get("provides", {}).get("pgseal", {}).get("version"))
if meta.get("license") != "apache_2_0":
    bad.append("license is %r" % meta.get("license"))
if meta.get("meta-spec", {}).get("version") != "1.0.0":
    bad.append("meta-spec.version is not 1.0.0")
for k in ("name", "abstract", "maintainer", "prereqs", "release_status"):
    if k not in meta:
        bad.append("no %s" % k)
if bad:
    print("[package] META.json: " + "; ".join(bad), file=sys.stderr)
    sys.exit(1)
PYEOF
ARCH=$(dpkg --print-architecture)
MACHINE=$(uname -m)
# Reproducible timestamps: the last commit's time. Not exported to cargo: build scripts
# that use the cc crate (ring, pgrx-pg-sys) rerun when it changes, so exporting it would
# rebuild them after every commit; dpkg-deb gets it explicitly.
EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
YEAR_LAST=$(date -u -d "@$EPOCH" +%Y)
YEAR_FIRST=$(git log --reverse --format=%ad --date=format:%Y 2>/dev/null | head -1 || true)
YEARS=${YEAR_FIRST:-$YEAR_LAST}
[ "$YEARS" = "$YEAR_LAST" ] || YEARS=$YEARS-$YEAR_LAST
log "pgseal $VERSION, $ARCH; building into $OUT"

rm -rf "$OUT" "$WORK"
mkdir -p "$OUT" "$WORK"

# ---- release builds -----------------------------------------------------------------
# cargo pgrx package writes the files under <out-dir> + the absolute directories the
# given pg_config reports (pkglibdir, sharedir/extension), upgrade scripts from
# extension/sql/ included.
pgrx_package() {  # pgrx_package MAJOR OUTDIR
    local major=$1 dir=$2 pgc
    pgc=$(pg_config_of "$major")
    [ -x "$pgc" ] || die "no pg_config for PostgreSQL $major at $pgc (run make setup)"
    (cd extension && cargo pgrx package --pg-config "$pgc" \
        --no-default-features --features "pg$major" --out-dir "$dir")
}
step "cargo pgrx package for PostgreSQL $EXT_PG (release)"
pgrx_package "$EXT_PG" "$WORK/pgrx-$EXT_PG"
step "cargo pgrx package for PostgreSQL $TAR_PG (release)"
pgrx_package "$TAR_PG" "$WORK/pgrx-$TAR_PG"
step "cargo build --release -p pgseald"
cargo build --release -p pgseald
step "builds done"

# The extension's files out of a cargo pgrx package tree, checked: the library, the
# control file (default_version = VERSION), the install script, and whatever upgrade
# scripts there are; nothing else.
#   ext_files MAJOR TREE  -> sets PKGLIBDIR, EXTDIR (absolute paths in that PostgreSQL)
ext_files() {
    local major=$1 tree=$2 pgc f rel
    pgc=$(pg_config_of "$major")
    PKGLIBDIR=$("$pgc" --pkglibdir)
    EXTDIR=$("$pgc" --sharedir)/extension
    [ -f "$tree$PKGLIBDIR/pgseal.so" ] || die "PostgreSQL $major: no $PKGLIBDIR/pgseal.so in $tree"
    [ -f "$tree$EXTDIR/pgseal.control" ] || die "PostgreSQL $major: no pgseal.control"
    [ -f "$tree$EXTDIR/pgseal--$VERSION.sql" ] || die "PostgreSQL $major: no pgseal--$VERSION.sql"
    grep -qx "default_version = '$VERSION'" "$tree$EXTDIR/pgseal.control" \
        || die "PostgreSQL $major: pgseal.control's default_version is not '$VERSION'"
    while IFS= read -r f; do
        rel=${f#"$tree"}
        case "$rel" in
        "$PKGLIBDIR/pgseal.so" | "$EXTDIR/pgseal.control" | "$EXTDIR"/pgseal--*.sql) ;;
        *) die "PostgreSQL $major: unexpected file $rel from cargo pgrx package" ;;
        esac
    done < <(find "$tree" -type f -o -type l)
}

# Debian's dh_strip does this; the dynamic symbols PostgreSQL looks up stay.
strip_so() { strip --remove-section=.comment --remove-section=.note --strip-unneeded "$1"; }
strip_exe() { strip --remove-section=.comment --remove-section=.note "$1"; }

# "libc6 (>= 2.xx)"-style dependencies of ELF files, from dpkg-shlibdeps (which wants a
# debian/control to exist; a minimal one in a scratch directory will do).
shlibs_depends() {
    local scratch=$WORK/shlibdeps out
    mkdir -p "$scratch/debian"
    printf 'Source: pgseal\n\nPackage: pgseal\nArchitecture: any\n' > "$scratch/debian/control"
    out=$(cd "$scratch" && dpkg-shlibdeps -O "$@" 2>"$scratch/warnings.log") \
        || die "dpkg-shlibdeps failed: $(cat "$scratch/warnings.log")"
    echo "${out#shlibs:Depends=}"
}

# Newest GLIBC_x.y symbol version an ELF file needs.
glibc_needed() {
    objdump -T "$1" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1
}

# fill TEMPLATE KEY=VALUE...  (replaces @KEY@)
fill() {
    local tpl=$1 kv; shift
    local text; text=$(cat "$tpl")
    for kv in "$@"; do text=${text//"@${kv%%=*}@"/"${kv#*=}"}; done
    if LC_ALL=C grep -q '@[A-Z_]*@' <<<"$text"; then die "unfilled field in $tpl: $(LC_ALL=C grep -o '@[A-Z_]*@' <<<"$text" | head -1)"; fi
    printf '%s\n' "$text"
}

# /usr/share/doc/PKG: copyright and a (native package's) changelog.gz.
doc_files() {  # doc_files STAGE PKG
    local doc=$1/usr/share/doc/$2
    install -d "$doc"
    fill packaging/copyright YEAR="$YEARS" > "$doc/copyright"
    fill packaging/changelog.in PACKAGE="$2" VERSION="$VERSION" MAINTAINER="$MAINTAINER" \
        DATE="$(LC_ALL=C date -u -R -d "@$EPOCH")" | gzip -9n > "$doc/changelog.gz"
    chmod 0644 "$doc/copyright" "$doc/changelog.gz"
}

# Finish a staged tree: modes, timestamps, md5sums (conffiles excluded, as dh_md5sums
# does), Installed-Size, control file; then dpkg-deb.
build_deb() {  # build_deb STAGE TEMPLATE NAME DEPENDS_EXTRA
    local stage=$1 tpl=$2 name=$3 deps=$4 size
    find "$stage" -path "$stage/DEBIAN" -prune -o -type d -exec chmod 0755 {} +
    (cd "$stage" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\n' \
        | LC_ALL=C sort | xargs -r md5sum > DEBIAN/md5sums)
    size=$(du -sk --apparent-size --exclude=DEBIAN "$stage" | cut -f1)
    fill "$tpl" VERSION="$VERSION" ARCH="$ARCH" MAINTAINER="$MAINTAINER" \
        INSTALLED_SIZE="$size" PGMAJOR="$EXT_PG" SHLIBS_DEPENDS="${deps:+, $deps}" \
        > "$stage/DEBIAN/control"
    find "$stage" -exec touch -h -d "@$EPOCH" {} +
    SOURCE_DATE_EPOCH=$EPOCH dpkg-deb --root-owner-group -Zxz --build "$stage" "$OUT/${name}_${VERSION}_${ARCH}.deb" >/dev/null
    log "built ${name}_${VERSION}_${ARCH}.deb"
}

# ---- postgresql-15-pgseal -----------------------------------------------------------
step "postgresql-$EXT_PG-pgseal"
tree=$WORK/pgrx-$EXT_PG
ext_files "$EXT_PG" "$tree"
stage=$WORK/deb-postgresql-$EXT_PG-pgseal
pkg=postgresql-$EXT_PG-pgseal
install -d "$stage/DEBIAN" "$stage$PKGLIBDIR" "$stage$EXTDIR"
install -m 0644 "$tree$PKGLIBDIR/pgseal.so" "$stage$PKGLIBDIR/"
strip_so "$stage$PKGLIBDIR/pgseal.so"
install -m 0644 "$tree$EXTDIR"/pgseal* "$stage$EXTDIR/"
doc_files "$stage" "$pkg"
log "  extension files: $(cd "$stage$EXTDIR" && ls | tr '\n' ' ')"
build_deb "$stage" packaging/postgresql-pgseal/control.in "$pkg" \
    "$(shlibs_depends "$stage$PKGLIBDIR/pgseal.so")"

# ---- pgseald ------------------------------------------------------------------------
step "pgseald"
grep -qx 'ExecStart=/usr/bin/pgseald run --config /etc/pgseald/pgseald.toml' docs/pgseald.service \
    || die "docs/pgseald.service: ExecStart must run /usr/bin/pgseald (where the package puts it)"
stage=$WORK/deb-pgseald
install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/etc/pgseald" "$stage/lib/systemd/system"
install -m 0755 "$TARGET_DIR/release/pgseald" "$stage/usr/bin/pgseald"
strip_exe "$stage/usr/bin/pgseald"
install -m 0644 docs/pgseald.toml.example "$stage/etc/pgseald/pgseald.toml.example"
install -m 0644 docs/pgseald.service "$stage/lib/systemd/system/pgseald.service"
doc_files "$stage" pgseald
install -m 0644 packaging/pgseald/conffiles "$stage/DEBIAN/conffiles"
for s in postinst prerm postrm; do install -m 0755 "packaging/pgseald/$s" "$stage/DEBIAN/$s"; done
build_deb "$stage" packaging/pgseald/control.in pgseald \
    "$(shlibs_depends "$stage/usr/bin/pgseald")"

# ---- PostgreSQL 18 tarball ----------------------------------------------------------
step "PostgreSQL $TAR_PG tarball"
tree=$WORK/pgrx-$TAR_PG
ext_files "$TAR_PG" "$tree"
top=pgseal-$VERSION-pg$TAR_PG
stage=$WORK/tar/$top
install -d "$stage/lib" "$stage/share/extension"
install -m 0755 "$tree$PKGLIBDIR/pgseal.so" "$stage/lib/"
strip_so "$stage/lib/pgseal.so"
install -m 0644 "$tree$EXTDIR"/pgseal* "$stage/share/extension/"
install -m 0644 LICENSE "$stage/LICENSE"
install -m 0755 packaging/tarball/install.sh "$stage/install.sh"
echo "$TAR_PG" > "$stage/PG_MAJOR"
fill packaging/tarball/INSTALL.md VERSION="$VERSION" PGMAJOR="$TAR_PG" ARCH="$MACHINE" \
    GLIBC="$(glibc_needed "$stage/lib/pgseal.so")" > "$stage/INSTALL.md"
tarball=$top-$MACHINE-linux.tar.gz
find "$stage" -exec touch -h -d "@$EPOCH" {} +
tar -C "$WORK/tar" --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime="@$EPOCH" -cf - "$top" | gzip -n -9 > "$OUT/$tarball"
log "built $tarball"

# ---- META.json, checksums -----------------------------------------------------------
install -m 0644 META.json "$OUT/META.json"
(cd "$OUT" && sha256sum -- *.deb *.tar.gz META.json > SHA256SUMS)
step "done"
ls -l "$OUT"
