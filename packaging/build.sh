#!/bin/sh
# Build spawnd's distribution packages.
#
#   packaging/build.sh [-o DIR] deb|rpm|all    build spawnd_<version>_all.deb and/or
#                                              spawnd-<version>.noarch.rpm into DIR
#   packaging/build.sh deps [deb|rpm|all|check] install the Debian packages needed to build
#                                              (and, with "check", to lint) them; root only
#
# DIR is -o DIR, else $SPAWND_PKG_DIR, else build/packages/ in the source tree. The
# version comes from spawnd/__init__.py. Each build happens in a fresh directory outside
# the source tree (under $TMPDIR), removed afterwards: the source tree is never written to
# except for DIR.
set -eu
# Distribution packages are built with the distribution's tools and python3, whatever
# python a pyenv or a virtual environment puts first on PATH.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PYTHONUSERBASE

SRC=$(cd "$(dirname "$0")/.." && pwd)
DEB_DEPS="debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools dpkg-dev fakeroot"
RPM_DEPS="rpm python3-build python3-installer python3-setuptools python3-wheel"
CHECK_DEPS="lintian rpmlint mandoc groff-base man-db cpio systemd util-linux"

usage() {
    sed -n '2,11s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

die() {
    echo "build.sh: $*" >&2
    exit 1
}

version() {
    v=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$SRC/spawnd/__init__.py")
    [ -n "$v" ] || die "no __version__ = \"...\" line in spawnd/__init__.py"
    echo "$v"
}

install_deps() {
    want=""
    case "${1:-all}" in
        deb) want=$DEB_DEPS ;;
        rpm) want=$RPM_DEPS ;;
        all) want="$DEB_DEPS $RPM_DEPS" ;;
        check) want="$DEB_DEPS $RPM_DEPS $CHECK_DEPS" ;;
        *) usage ;;
    esac
    missing=""
    for p in $want; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing $p"
    done
    [ -n "$missing" ] || return 0
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages:$missing (run as root, or apt-get install them)"
    echo "build.sh: apt-get install$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing </dev/null
}

# A copy of what the packages are built from, without VCS data or build leftovers.
copy_source() {
    mkdir -p "$1"
    (cd "$SRC" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
        pyproject.toml README.md spawnd docs packaging) | tar -xf - -C "$1"
}

# Date of the last commit (reproducible builds), else now.
build_date() {
    if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
        echo "$SOURCE_DATE_EPOCH"
    else
        git -C "$SRC" log -1 --format=%ct 2>/dev/null || date +%s
    fi
}

build_deb() {
    v=$(version)
    tree="$WORK/deb/spawnd-$v"
    copy_source "$tree"
    cp -r "$SRC/packaging/debian" "$tree/debian"
    cp "$SRC/packaging/systemd/spawnd.service" "$tree/debian/spawnd.service"
    {
        echo "spawnd ($v) unstable; urgency=medium"
        echo
        echo "  * Release $v; see README.md for what changed."
        echo
        echo " -- spawnd maintainers <spawnd@packages.invalid>  $(date -R -u -d "@$(build_date)")"
    } > "$tree/debian/changelog"
    (cd "$tree" && dpkg-buildpackage -b -us -uc --no-pre-clean >"$WORK/deb/build.log" 2>&1) \
        || { tail -40 "$WORK/deb/build.log" >&2; die "dpkg-buildpackage failed (log above)"; }
    cp "$WORK/deb/spawnd_${v}_all.deb" "$OUT/"
    echo "$OUT/spawnd_${v}_all.deb"
}

build_rpm() {
    v=$(version)
    top="$WORK/rpm"
    mkdir -p "$top/SOURCES" "$top/SPECS"
    copy_source "$top/src/spawnd-$v"
    tar -czf "$top/SOURCES/spawnd-$v.tar.gz" -C "$top/src" "spawnd-$v"
    cp "$SRC/packaging/rpm/spawnd.spec" "$top/SPECS/"
    # --nodeps: rpmbuild checks BuildRequires against the rpm database, which is empty on
    # Debian; install_deps covers them with Debian packages.
    rpmbuild -bb --nodeps \
        --define "_topdir $top" \
        --define "spawnd_version $v" \
        --define "spawnd_date $(LC_ALL=C date -u -d "@$SOURCE_DATE_EPOCH" '+%a %b %d %Y')" \
        --define "_rpmfilename %%{NAME}-%%{VERSION}.%%{ARCH}.rpm" \
        --define "source_date_epoch_from_changelog 0" \
        "$top/SPECS/spawnd.spec" >"$top/build.log" 2>&1 \
        || { tail -40 "$top/build.log" >&2; die "rpmbuild failed (log above)"; }
    cp "$top/RPMS/spawnd-$v.noarch.rpm" "$OUT/"
    echo "$OUT/spawnd-$v.noarch.rpm"
}

OUT=${SPAWND_PKG_DIR:-$SRC/build/packages}
while [ $# -gt 0 ]; do
    case "$1" in
        -o) [ $# -ge 2 ] || usage; OUT=$2; shift 2 ;;
        -h|--help) usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage
what=$1
shift
if [ "$what" = deps ]; then
    install_deps "$@"
    exit 0
fi
case "$what" in deb|rpm|all) ;; *) usage ;; esac
[ $# -eq 0 ] || usage

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ "$OUT" != "$SRC" ] || die "refusing to write packages into the source tree's root; use -o DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spawnd-pkg.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
export SOURCE_DATE_EPOCH="$(build_date)"

case "$what" in
    deb) build_deb ;;
    rpm) build_rpm ;;
    all) build_deb; build_rpm ;;
esac
