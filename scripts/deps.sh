# Sourced by the scripts: installs the Debian packages sbn needs, once.
SBN_DEBIAN_PACKAGES="build-essential cmake pkg-config libuv1-dev libprotobuf-c-dev protobuf-c-compiler check libssl-dev"

# Open MPI: the reference sbn-bench measures the round rows against
# (bench/mpi_ref.c); the tests run sbn-bench too.  Not needed to build or use sbn.
SBN_DEBIAN_BENCH_PACKAGES="openmpi-bin libopenmpi-dev"

# sbn_install_deps [bench]: the build's packages, and with "bench" the
# benchmarks' too.
sbn_install_deps() {
  local missing=() extra=()
  for p in $SBN_DEBIAN_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ "${1:-}" = bench ]; then
    for p in $SBN_DEBIAN_BENCH_PACKAGES; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || extra+=("$p")
    done
  fi
  [ ${#missing[@]} -eq 0 ] && [ ${#extra[@]} -eq 0 ] && return 0
  echo "installing: ${missing[*]} ${extra[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update
  [ ${#missing[@]} -eq 0 ] ||
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${missing[@]}"
  # Open MPI's recommends include a Fortran toolchain, which nothing here needs.
  [ ${#extra[@]} -eq 0 ] ||
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${extra[@]}"
}
