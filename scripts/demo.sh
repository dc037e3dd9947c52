#!/usr/bin/env bash
# The main job: installs what is missing, builds, starts sbn-coordinator and
# 4 workers (examples/train.c) on 127.0.0.1, trains a classifier with
# SyncBatchNorm and gradient averaging, and shuts everything down.
#   ./scripts/demo.sh                    4 workers, defaults
#   SBN_DEMO_WORKERS=2 ./scripts/demo.sh -- --epochs 10
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
sbn_install_deps

workers=${SBN_DEMO_WORKERS:-4}
[ "${1:-}" = "--" ] && shift
build=build-demo
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DSBN_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" -j "$(nproc 2>/dev/null || echo 2)" --target sbn-coordinator sbn-train >/dev/null

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "${coord:-}" ] && kill -9 "$coord" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

# Port 0: the coordinator picks a free port and prints it.
"$build/server/sbn-coordinator" --listen 127.0.0.1:0 --log-level warn >"$tmp/coord.out" &
coord=$!
for _ in $(seq 100); do
  grep -q listening "$tmp/coord.out" 2>/dev/null && break
  sleep 0.1
done
addr=$(sed -n 's/^sbn-coordinator listening on //p' "$tmp/coord.out")
[ -n "$addr" ] || { echo "demo: the coordinator did not start" >&2; exit 1; }
echo "demo: sbn-coordinator on $addr, starting $workers workers"

job="demo-$$"
for ((r = 0; r < workers; r++)); do
  SBN_COORDINATOR=$addr SBN_RANK=$r SBN_WORLD_SIZE=$workers SBN_JOB=$job \
    "$build/examples/sbn-train" "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  wait "$p" || status=$?
done
pids=()
kill -TERM "$coord"
wait "$coord" || { echo "demo: coordinator exited with $?" >&2; status=1; }
coord=
echo "demo: done (exit $status)"
exit "$status"
