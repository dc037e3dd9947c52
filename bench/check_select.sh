#!/bin/sh
# ctest bench_select: sbn-bench's row selection picks exactly the row asked
# for, and bad values are refused with status 2 and a message naming the
# option.  With the MPI reference built ($2 = 1), the row comes with its
# round_mpi line and mpi_ratio, --mpi no leaves them out, and an mpirun that
# cannot run fails the bench (status 1) naming --mpirun.  No timing is
# checked.  $1: the sbn-bench binary; $2: 1 when it was built with MPI,
# then $3 mpiexec and $4 sbn-bench-mpi.  When mpiexec cannot start two
# ranks at all on this machine (a restricted container), the MPI checks are
# skipped, saying so, and the others still run.
set -u
bench=$1
has_mpi=${2:-0}
if [ "$has_mpi" = 1 ]; then
  probe=$(mktemp)
  root=""
  [ "$(id -u)" -eq 0 ] && root="--allow-run-as-root"
  # shellcheck disable=SC2086 # $root is empty or one word
  if ! timeout 60 "$3" -np 2 --oversubscribe $root --mca pml ob1 --mca btl self,tcp \
    "$4" stats 1 0 1 "$probe" >"$probe.log" 2>&1; then
    echo "bench_select: SKIPPING the MPI checks: $3 cannot start 2 ranks here:" >&2
    cat "$probe.log" >&2
    has_mpi=skip
  fi
  rm -f "$probe" "$probe.log"
fi
out=$(mktemp) err=$(mktemp)
trap 'rm -f "$out" "$err"' EXIT
fail() { echo "bench_select: $*" >&2; cat "$err" >&2; exit 1; }
row="--quick --only round --workers 2 --channels 64"

# shellcheck disable=SC2086 # $row is several words
"$bench" $row --spin no >"$out" 2>"$err" || fail "selected run exited $?"
[ "$(grep -c '"bench":"round"' "$out")" -eq 1 ] || fail "wanted one round line, got: $(cat "$out")"
grep '"bench":"round"' "$out" | grep -q '"workers":2,"channels":64,.*"spin":false' ||
  fail "not the row asked for: $(cat "$out")"
[ "$(grep -c '"bench":"floor_star"' "$out")" -eq 1 ] || fail "wanted one floor_star line"
if [ "$has_mpi" = 1 ]; then
  [ "$(grep -c '"bench":"round_mpi","workers":2,"channels":64,' "$out")" -eq 1 ] ||
    fail "wanted one round_mpi line for the row, got: $(cat "$out")"
  grep '"bench":"round"' "$out" | grep -q '"mpi_ratio":[0-9]' || fail "no mpi_ratio: $(cat "$out")"

  # shellcheck disable=SC2086
  "$bench" $row --spin no --mpi no >"$out" 2>"$err" || fail "--mpi no exited $?"
  ! grep -q 'mpi' "$out" || fail "--mpi no still measured MPI: $(cat "$out")"

  # shellcheck disable=SC2086
  "$bench" $row --spin no --mpirun /bin/false >"$out" 2>"$err"
  st=$?
  [ "$st" -eq 1 ] || fail "--mpirun /bin/false exited $st, wanted 1"
  grep -q -- "--mpirun" "$err" || fail "--mpirun /bin/false: the message does not name --mpirun"

  # An mpirun that never finishes (nor does the rank it started) is killed
  # with its whole process group at its time bound (30 s and a bit), and
  # the bench fails saying so.
  hang=$(mktemp) pidf=$(mktemp)
  printf '#!/bin/sh\n[ "$1" = --version ] && { echo "mpiexec (OpenRTE) 4.1.4"; exit 0; }\nsleep 1000 &\necho $! >%s\nwait\n' "$pidf" >"$hang"
  chmod +x "$hang"
  # shellcheck disable=SC2086
  "$bench" $row --spin no --mpirun "$hang" >"$out" 2>"$err"
  st=$?
  rank=$(cat "$pidf")
  rm -f "$hang" "$pidf"
  [ "$st" -eq 1 ] || fail "a hanging mpirun: exit $st, wanted 1"
  grep -q "did not finish in" "$err" || fail "a hanging mpirun: no time-out message"
  [ -n "$rank" ] || fail "a hanging mpirun: its rank never started"
  # Killed means gone or a zombie not yet reaped by init (kill -0 succeeds
  # on those); give the kill 2 s to land.
  alive() { [ -r "/proc/$1/stat" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat"; }
  i=0
  while alive "$rank" && [ $i -lt 20 ]; do sleep 0.1; i=$((i + 1)); done
  ! alive "$rank" || fail "a hanging mpirun: its rank $rank outlived the bound"
elif [ "$has_mpi" = 0 ]; then
  ! grep -q 'mpi' "$out" || fail "built without MPI, yet measured it: $(cat "$out")"
fi

# The gloo bench: a Python without torch (gloo.py's status 3) is skipped
# with a note; one that fails fails the bench; only whole JSON objects of
# its output reach stdout.
fake=$(mktemp)
trap 'rm -f "$out" "$err" "$fake"' EXIT
printf '#!/bin/sh\nexit 3\n' >"$fake" && chmod +x "$fake"
"$bench" --quick --only gloo --python "$fake" >"$out" 2>"$err" || fail "gloo without torch exited $?"
grep -q "gloo: skipped" "$err" || fail "gloo without torch: no note"
[ ! -s "$out" ] || fail "gloo without torch printed results"
printf '#!/bin/sh\necho "{\\"bench\\":\\"gloo\\"}"\necho "Traceback"\nexit 1\n' >"$fake"
"$bench" --quick --only gloo --python "$fake" >"$out" 2>"$err"
st=$?
[ "$st" -eq 1 ] || fail "a failing gloo.py: exit $st, wanted 1"
[ "$(cat "$out")" = '{"bench":"gloo"}' ] || fail "a failing gloo.py: stdout was: $(cat "$out")"

for bad in "--workers 3" "--channels 100" "--spin maybe" "--mpi /nonexistent"; do
  # shellcheck disable=SC2086 # the option and its value are two words
  "$bench" --quick --only round $bad >"$out" 2>"$err"
  st=$?
  [ "$st" -eq 2 ] || fail "'$bad' exited $st, wanted 2"
  opt=${bad%% *}
  grep -q -- "$opt" "$err" || fail "'$bad': the message does not name $opt"
  [ ! -s "$out" ] || fail "'$bad' printed results"
done
echo "bench_select: ok"
