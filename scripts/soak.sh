#!/usr/bin/env bash
# The soak test, on request (not part of the default ctest run): 8 workers x
# 100,000 rounds against a real coordinator with a shared secret, every
# result checked, coordinator VmRSS/VmHWM and open descriptors printed before,
# during and after.  Figures of the last recorded run: docs/security.md.
#   scripts/soak.sh                          8 workers, 100000 rounds
#   SBN_SOAK_WORKERS=4 SBN_SOAK_ROUNDS=20000 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
sbn_install_deps
dir=${SBN_BUILD_DIR:-build}
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$dir" -j "$(nproc 2>/dev/null || echo 2)" --target test_soak sbn-coordinator
SBN_SOAK=1 SBN_TEST_QUIET=1 "$dir/tests/test_soak"
