#!/bin/sh
# Checks what libsbn-client exports.
#
#   check_exports.sh LIBSBN_CLIENT.so LIBSBN_CLIENT.a INCLUDE_DIR
#
# - the shared library's dynamic symbols are exactly the functions declared
#   SBN_API in INCLUDE_DIR/sbn/*.h: nothing internal (sbn__*), nothing of
#   protobuf-c's generated code, and nothing declared but missing;
# - every global symbol the static archive defines starts with "sbn_", so
#   linking it cannot clash with a user's own names.
set -eu

so=$1
archive=$2
include=$3
# Symbols a sanitizer build adds by itself (ASan's ODR indicators, ...).
instrumentation='^(__odr_asan[._]|__asan_|__ubsan_|__sanitizer_|__sancov_)'
work=$(mktemp -d "${TMPDIR:-/tmp}/sbn-exports.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
status=0

nm -D --defined-only "$so" | awk '{ print $NF }' | grep -Ev "$instrumentation" | sort -u > "$work/exported"
grep -h '^SBN_API' "$include"/sbn/*.h |
  sed -E 's/^SBN_API[^(]*[ *](sbn_[a-z0-9_]+) *\(.*/\1/' | sort -u > "$work/declared"

leaked=$(grep -v '^sbn_[a-z0-9]' "$work/exported" || true)
if [ -n "$leaked" ]; then
  echo "FAIL: $so exports symbols outside the public API:" >&2
  echo "$leaked" | sed 's/^/  /' >&2
  status=1
fi
extra=$(comm -13 "$work/declared" "$work/exported")
if [ -n "$extra" ]; then
  echo "FAIL: $so exports functions no header declares SBN_API:" >&2
  echo "$extra" | sed 's/^/  /' >&2
  status=1
fi
missing=$(comm -23 "$work/declared" "$work/exported")
if [ -n "$missing" ]; then
  echo "FAIL: functions declared SBN_API in $include/sbn are not exported by $so:" >&2
  echo "$missing" | sed 's/^/  /' >&2
  status=1
fi

foreign=$(nm -g --defined-only "$archive" | awk 'NF == 3 { print $3 }' |
  grep -Ev "$instrumentation" | grep -v '^sbn_' | sort -u || true)
if [ -n "$foreign" ]; then
  echo "FAIL: $archive defines global symbols without the sbn_ prefix:" >&2
  echo "$foreign" | sed 's/^/  /' >&2
  status=1
fi

if [ "$status" -eq 0 ]; then
  echo "ok: $(wc -l < "$work/exported") exported symbols, all declared SBN_API; archive namespaced"
fi
exit "$status"
