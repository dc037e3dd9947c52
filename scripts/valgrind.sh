#!/usr/bin/env bash
# Runs the integration tests with the coordinator under valgrind memcheck
# (SBN_TEST_COORD_WRAPPER, see tests/support/coord_proc.c): any invalid
# access, or a definite or indirect leak when it exits, makes it exit 99,
# and the tests that stop it cleanly check for exit status 0.  Then runs
# test_rounds itself under valgrind (the client library in every forked
# worker).  Not part of the default ctest run; results in docs/security.md.
#   scripts/valgrind.sh [test ...]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed"; exit 1; }
dir=${SBN_BUILD_DIR:-build-valgrind}
if [ -z "${SBN_NO_BUILD:-}" ]; then # SBN_NO_BUILD=1: use what $dir holds
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$dir" -j "$(nproc 2>/dev/null || echo 2)"
fi
tests=("$@")
[ ${#tests[@]} -eq 0 ] && tests=(test_coordinator test_auth test_limits test_poison test_faults \
  test_rounds test_syncbn_dist test_collectives)
vg="valgrind --leak-check=full --show-leak-kinds=definite,indirect"
vg="$vg --errors-for-leak-kinds=definite,indirect --error-exitcode=99"
rm -f "$dir"/valgrind-coord.*.log
# One log per coordinator process, summarized at the end.
export SBN_TEST_COORD_WRAPPER="$vg --log-file=$dir/valgrind-coord.%p.log"
export CK_DEFAULT_TIMEOUT=600
fail=0
for t in "${tests[@]}"; do
  echo "== $t (coordinator under valgrind)"
  if ! SBN_TEST_QUIET=1 "$dir/tests/$t" 2>&1 | tee "$dir/valgrind-$t.log" | grep -E "^[0-9]+%|==[0-9]+=="; then
    :
  fi
  grep -q "^100%" "$dir/valgrind-$t.log" || { echo "$t: FAILED"; fail=1; }
done
logs=("$dir"/valgrind-coord.*.log)
echo "== coordinator runs under valgrind: ${#logs[@]}"
echo "   with errors: $(grep -lE 'ERROR SUMMARY: [1-9]' "${logs[@]}" | wc -l)"
echo "   with definite or indirect leaks: $(grep -lE '(definitely|indirectly) lost: [1-9]' "${logs[@]}" | wc -l)"
echo "   clean exit, 0 bytes in use: $(grep -l 'in use at exit: 0 bytes in 0 blocks' "${logs[@]}" | wc -l)"
echo "   killed (SIGKILL by the fault tests, no summary): $(grep -L 'ERROR SUMMARY' "${logs[@]}" | wc -l)"
grep -lE "ERROR SUMMARY: [1-9]|(definitely|indirectly) lost: [1-9]" "${logs[@]}" && fail=1
echo "== test_rounds (workers under valgrind)"
unset SBN_TEST_COORD_WRAPPER
SBN_TEST_QUIET=1 $vg --quiet --child-silent-after-fork=no "$dir/tests/test_rounds" 2>&1 |
  tee "$dir/valgrind-client.log" | grep -E "^[0-9]+%|==[0-9]+==" || true
grep -q "^100%" "$dir/valgrind-client.log" || { echo "client under valgrind: FAILED"; fail=1; }
[ $fail -eq 0 ] && echo "== valgrind: all passed" || { echo "== valgrind: failures above"; exit 1; }
