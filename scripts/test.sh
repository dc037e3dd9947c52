#!/usr/bin/env bash
# Installs what is missing (Debian), builds sbn twice (Release, the build the
# demo and users get, and AddressSanitizer + UndefinedBehaviorSanitizer) and
# runs every test in both; then the threads test under ThreadSanitizer, a
# clang build (when clang is there) and a brief fuzzing run.
#   ./scripts/test.sh            everything
#   SBN_TEST_FAST=1 ./scripts/test.sh   plain build only
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
sbn_install_deps bench

jobs=$(nproc 2>/dev/null || echo 2)
run_suite() {
  local dir=$1 type=$2; shift 2
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE="$type" "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
  (cd "$dir" && ctest --output-on-failure -j "$jobs" --timeout 300)
}

echo "== Release build"
run_suite build Release
if [ -z "${SBN_TEST_FAST:-}" ]; then
  echo "== AddressSanitizer + UndefinedBehaviorSanitizer build"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_suite build-asan RelWithDebInfo -DSBN_SANITIZE=ON
fi
if [ -z "${SBN_TEST_FAST:-}" ]; then
  # The library's promises to threads (a context per thread, thread-local
  # errors, a shared buffer cache): test_syncbn_dist runs its ranks as threads
  # of one process too.  ThreadSanitizer build of that test only.
  echo "== ThreadSanitizer (ranks as threads of one process)"
  cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSBN_SANITIZE_THREAD=ON >/dev/null
  cmake --build build-tsan -j "$jobs" --target test_syncbn_dist sbn-coordinator >/dev/null
  # Without address randomization where allowed (not in every container):
  # gcc 12's TSan cannot map its shadow memory under the larger mmap
  # randomization of some newer kernels.
  norand=()
  if setarch "$(uname -m)" -R true 2>/dev/null; then norand=(setarch "$(uname -m)" -R); fi
  (cd build-tsan && TSAN_OPTIONS=halt_on_error=1 \
    "${norand[@]}" ctest -R '^test_syncbn_dist$' --output-on-failure)
fi
if [ -z "${SBN_TEST_FAST:-}" ] && command -v clang >/dev/null 2>&1; then
  # Users build with clang too: its warnings differ from GCC's (-Werror makes
  # them errors), and the kernels have GCC-only paths. Build only; the suites
  # above ran the tests.
  echo "== clang build (-Wall -Wextra -Werror)"
  CC=clang cmake -S . -B build-clang -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build-clang -j "$jobs" >/dev/null
fi
if [ -z "${SBN_TEST_FAST:-}" ]; then
  # A short libFuzzer run (15 s + 10 s) with ASan + UBSan; the long runs are
  # on request (tests/fuzz/run.sh 600 300), their figures in docs/security.md.
  if command -v clang >/dev/null 2>&1; then
    echo "== fuzzing (brief)"
    tests/fuzz/run.sh 15 10
  else
    echo "== fuzzing skipped: clang is not installed"
  fi
fi
echo "== all tests passed"
