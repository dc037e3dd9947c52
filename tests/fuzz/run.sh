#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan + coverage) in
# build-fuzz and runs each for a while, starting from the seed corpus in
# tests/fuzz/corpus (new inputs go to build-fuzz/corpus, the repo's seeds
# stay small).  Any crash, leak or sanitizer report fails the run; the
# reproducer is left in build-fuzz/artifacts.
#   tests/fuzz/run.sh              60 s per target
#   tests/fuzz/run.sh 600 300      600 s for fuzz_coord, 300 s for fuzz_frame
set -euo pipefail
cd "$(dirname "$0")/../.."
coord_s=${1:-60}
frame_s=${2:-$coord_s}
if ! command -v clang >/dev/null 2>&1; then
  echo "fuzz: clang not found, skipping (install clang and libclang-rt-dev)"
  exit 0
fi
CC=clang cmake -S . -B build-fuzz -DSBN_FUZZ=ON -DSBN_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-fuzz -j "$(nproc 2>/dev/null || echo 2)" --target fuzz_frame fuzz_coord
mkdir -p build-fuzz/corpus/coord build-fuzz/corpus/frame build-fuzz/artifacts
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
run() {
  local name=$1 secs=$2 st=0
  local log="build-fuzz/fuzz_$name.log"
  echo "== $name for $secs s"
  "build-fuzz/tests/fuzz/fuzz_$name" -max_total_time="$secs" -print_final_stats=1 \
    -timeout=20 -rss_limit_mb=2048 -artifact_prefix=build-fuzz/artifacts/ \
    "build-fuzz/corpus/$name" "tests/fuzz/corpus/$name" >"$log" 2>&1 || st=$?
  grep -E "^#[0-9]+[[:space:]]+(DONE|INITED)|^stat::|ERROR|SUMMARY|runtime error|leak|crash-" \
    "$log" || true
  if [ "$st" -ne 0 ]; then
    echo "fuzz_$name FAILED (status $st), see $log"
    exit 1
  fi
}
run coord "$coord_s"
run frame "$frame_s"
echo "== fuzzing passed"
