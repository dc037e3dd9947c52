#!/bin/sh
# Installs a built tree into a temporary prefix and builds a program against
# the installed copy the four ways a user would: pkg-config + cc and CMake's
# find_package(sbn), each with the shared and the static library.  Every
# program must run and report the expected version.  Hermetic: everything
# happens under one temporary directory, removed at the end.
#
#   run.sh BUILD_DIR VERSION
#
# Environment: CMAKE (default cmake), CC (default cc), SBN_CONSUMER_FLAGS
# (extra compile and link flags, e.g. the sanitizers the library was built
# with).
set -eu

build=$1
version=$2
here=$(cd "$(dirname "$0")" && pwd)
cmake=${CMAKE:-cmake}
cc=${CC:-cc}
flags=${SBN_CONSUMER_FLAGS:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/sbn-install.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
prefix=$work/prefix

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# Runs a built consumer and checks whether it carries libsbn-client.so.
check_program() { # program shared|static
  if readelf -d "$1" | grep -q 'NEEDED.*libsbn-client'; then linked=shared; else linked=static; fi
  [ "$linked" = "$2" ] || fail "$1 should link libsbn-client $2ally but links it $linked"
  "$1" "$version" || fail "$1 failed"
}

echo "== install into $prefix"
"$cmake" --install "$build" --prefix "$prefix" > "$work/install.log" 2>&1 ||
  { cat "$work/install.log" >&2; fail "cmake --install"; }
pcfile=$(find "$prefix" -name sbn-client.pc)
[ -n "$pcfile" ] || fail "no sbn-client.pc installed"
libdir=$(dirname "$(dirname "$pcfile")")
for f in include/sbn/sbn.h include/sbn/safetensors.h include/sbn/status.h bin/sbn-coordinator; do
  [ -e "$prefix/$f" ] || fail "$f not installed"
done
[ -f "$libdir/libsbn-client.a" ] || fail "no static library in $libdir"
[ -L "$libdir/libsbn-client.so" ] && [ -L "$libdir/libsbn-client.so.${version%%.*}" ] &&
  [ -f "$libdir/libsbn-client.so.$version" ] || fail "shared library not versioned in $libdir"
soname=$(readelf -d "$libdir/libsbn-client.so.$version" | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')
[ "$soname" = "libsbn-client.so.${version%%.*}" ] || fail "SONAME is '$soname'"
# Self-contained: every sbn symbol the archive uses, it defines.
nm "$libdir/libsbn-client.a" | awk '$1 == "U" && $2 ~ /^sbn_/ { print $2 }' | sort -u > "$work/used"
nm --defined-only "$libdir/libsbn-client.a" | awk 'NF == 3 { print $3 }' | sort -u > "$work/defined"
undefined=$(comm -23 "$work/used" "$work/defined")
[ -z "$undefined" ] || fail "libsbn-client.a uses sbn symbols it does not define: $undefined"
if find "$prefix" -name '*sbn_common*' -o -name '*.pb-c.h' -o -name 'internal.h' | grep -q .; then
  fail "internal files installed: $(find "$prefix" -name '*sbn_common*' -o -name '*.pb-c.h')"
fi

echo "== pkg-config"
export PKG_CONFIG_PATH="$libdir/pkgconfig"
[ "$(pkg-config --variable=libdir sbn-client)" = "$libdir" ] ||
  fail "pkg-config found another sbn-client.pc (libdir $(pkg-config --variable=libdir sbn-client))"
[ "$(pkg-config --modversion sbn-client)" = "$version" ] ||
  fail "pkg-config says version $(pkg-config --modversion sbn-client)"
# shellcheck disable=SC2046,SC2086
$cc $flags -o "$work/pc_shared" "$here/consumer.c" $(pkg-config --cflags --libs sbn-client) \
  -Wl,-rpath,"$libdir" -lm || fail "pkg-config shared build"
check_program "$work/pc_shared" shared
# The static archive by name, then what it needs (pkg-config --static).
static_libs=$(pkg-config --static --libs sbn-client | sed 's/-lsbn-client/-l:libsbn-client.a/')
# shellcheck disable=SC2046,SC2086
$cc $flags -o "$work/pc_static" "$here/consumer.c" $(pkg-config --cflags sbn-client) \
  $static_libs || fail "pkg-config static build"
check_program "$work/pc_static" static

echo "== find_package(sbn)"
"$cmake" -S "$here/cmake_consumer" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_C_COMPILER="$cc" -DCMAKE_C_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags" \
  -DSBN_EXPECTED_VERSION="$version" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF \
  > "$work/cmake.log" 2>&1 || { cat "$work/cmake.log" >&2; fail "configuring the CMake consumer"; }
grep -q "sbn $version from $libdir/cmake/sbn" "$work/cmake.log" ||
  { cat "$work/cmake.log" >&2; fail "find_package found another sbn"; }
"$cmake" --build "$work/cmake" > "$work/build.log" 2>&1 ||
  { cat "$work/build.log" >&2; fail "building the CMake consumer"; }
check_program "$work/cmake/consumer_shared" shared
check_program "$work/cmake/consumer_static" static

echo "ok: installed sbn $version used through pkg-config and find_package, shared and static"
