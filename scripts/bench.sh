#!/usr/bin/env bash
# Builds sbn in Release (build-release/) and runs sbn-bench, passing every
# argument through; the JSON lines go to stdout, build output and progress
# to stderr.
#   ./scripts/bench.sh                      everything (a few minutes)
#   ./scripts/bench.sh --quick              a smoke run of seconds
#   ./scripts/bench.sh --only floor,round > results.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
sbn_install_deps bench >&2

dir=${SBN_BENCH_BUILD_DIR:-build-release}
jobs=$(nproc 2>/dev/null || echo 2)
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DSBN_BUILD_TESTS=OFF >&2
cmake --build "$dir" -j "$jobs" --target sbn-bench sbn-coordinator >&2
exec "$dir/bench/sbn-bench" "$@"
