#!/bin/sh
# ctest bench_select: sbn-bench's row selection picks exactly the row asked
# for, and bad values are refused with status 2 and a message naming the
# option.  No timing is checked.  $1: the sbn-bench binary.
set -u
bench=$1
out=$(mktemp) err=$(mktemp)
trap 'rm -f "$out" "$err"' EXIT
fail() { echo "bench_select: $*" >&2; cat "$err" >&2; exit 1; }

"$bench" --quick --only round --workers 2 --channels 64 --spin no >"$out" 2>"$err" ||
  fail "selected run exited $?"
[ "$(grep -c '"bench":"round"' "$out")" -eq 1 ] || fail "wanted one round line, got: $(cat "$out")"
grep '"bench":"round"' "$out" | grep -q '"workers":2,"channels":64,.*"spin":false' ||
  fail "not the row asked for: $(cat "$out")"
[ "$(grep -c '"bench":"floor_star"' "$out")" -eq 1 ] || fail "wanted one floor_star line"

for bad in "--workers 3" "--channels 100" "--spin maybe"; do
  # shellcheck disable=SC2086 # the option and its value are two words
  "$bench" --quick --only round $bad >"$out" 2>"$err"
  st=$?
  [ "$st" -eq 2 ] || fail "'$bad' exited $st, wanted 2"
  opt=${bad%% *}
  grep -q -- "$opt" "$err" || fail "'$bad': the message does not name $opt"
  [ ! -s "$out" ] || fail "'$bad' printed results"
done
echo "bench_select: ok"
