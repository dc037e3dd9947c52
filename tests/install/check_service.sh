#!/bin/sh
# Installs a built tree into a temporary prefix and checks what a service
# needs: the systemd unit names the installed binary (written for the
# install prefix), is Type=notify and hardened, passes `systemd-analyze
# verify` when systemd is there; the example environment file and the man
# page are installed, and the man page renders without warnings.
#
#   check_service.sh BUILD_DIR
#
# Environment: CMAKE (default cmake).
set -eu

build=$1
cmake=${CMAKE:-cmake}
work=$(mktemp -d "${TMPDIR:-/tmp}/sbn-service.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
prefix=$work/prefix

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

"$cmake" --install "$build" --prefix "$prefix" >"$work/install.log" 2>&1 ||
  fail "cmake --install failed: $(cat "$work/install.log")"

unit=$prefix/lib/systemd/system/sbn-coordinator.service
[ -f "$unit" ] || fail "no unit at $unit"
exec_start=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit")
[ "$exec_start" = "$prefix/bin/sbn-coordinator" ] ||
  fail "ExecStart names '$exec_start', not the installed $prefix/bin/sbn-coordinator"
[ -x "$exec_start" ] || fail "$exec_start is not executable"
for line in Type=notify DynamicUser=yes NoNewPrivileges=yes ProtectSystem=strict \
  Restart=on-failure 'LoadCredential=secret:' 'EnvironmentFile=-/etc/default/sbn-coordinator' \
  'WatchdogSec='; do
  grep -q "^$line" "$unit" || fail "the unit lacks $line"
done
if grep -q '@SBN_' "$unit"; then fail "unsubstituted placeholders in $unit"; fi
if command -v systemd-analyze >/dev/null 2>&1; then
  systemd-analyze verify --man=no "$unit" >"$work/verify.log" 2>&1 ||
    fail "systemd-analyze verify: $(cat "$work/verify.log")"
fi

[ -f "$prefix/share/doc/sbn/sbn-coordinator.default" ] || fail "no example environment file"
grep -q '^SBN_COORDINATOR_OPTS=' "$prefix/share/doc/sbn/sbn-coordinator.default" ||
  fail "the example environment file does not set SBN_COORDINATOR_OPTS"

page=$prefix/share/man/man1/sbn-coordinator.1
[ -f "$page" ] || fail "no man page at $page"
if command -v groff >/dev/null 2>&1; then
  groff -man -Tutf8 -ww -z "$page" >"$work/groff.log" 2>&1 || fail "groff failed"
  [ ! -s "$work/groff.log" ] || fail "groff warns: $(cat "$work/groff.log")"
  # Every flag of --help is in the man page.
  for flag in $("$prefix/bin/sbn-coordinator" --help | grep -o -- '^  --[a-z-]*'); do
    grep -q -- "$(echo "$flag" | sed 's/-/\\\\-/g')" "$page" || fail "the man page lacks $flag"
  done
fi
echo "service files OK under $prefix"
