#!/usr/bin/env bash
# Make promtool available (Debian's `prometheus` package ships /usr/bin/promtool), for the checks of
# dashboards/prometheus/*.yml. Idempotent: nothing happens when promtool is already on PATH.
#
# Only the tool is wanted, never a running server, so the install
#  - skips Recommends (prometheus-node-exporter would be one more service),
#  - forbids service starts while the package is configured (a policy-rc.d that answers 101, put in place
#    only when the system has none, and removed again),
#  - then disables and stops the prometheus unit where systemd runs, so it does not start at boot either,
#  - and fails if a prometheus server is running afterwards that was not running before.
# Root runs apt-get directly; anyone else goes through sudo.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  echo "promtool: $(command -v promtool)"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "promtool is missing and apt-get is not available: install Prometheus' promtool by hand" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to install the prometheus package" >&2; exit 1; }
  SUDO=(sudo)
fi

server_pids() { pgrep -x prometheus 2>/dev/null | sort || true; }
before=$(server_pids)

POLICY=/usr/sbin/policy-rc.d
placed_policy=0
cleanup() {
  if [ "$placed_policy" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi
}
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# placed by llama-orch scripts/ensure-prometheus.sh during its install only\nexit 101\n' \
    | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 0755 "$POLICY"
  placed_policy=1
fi

apt_install() {
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
}
if ! apt_install; then  # stale or missing package lists: refresh once and retry
  "${SUDO[@]}" apt-get update -q
  apt_install
fi

if command -v systemctl >/dev/null 2>&1; then
  if [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  else  # no systemd running (a container): only drop the boot-time link the package made
    "${SUDO[@]}" systemctl disable prometheus.service >/dev/null 2>&1 || true
  fi
fi

after=$(server_pids)
if [ -n "$after" ] && [ "$after" != "$before" ]; then
  echo "a prometheus server is running after the install (pids: $after); stop it: systemctl disable --now prometheus" >&2
  exit 1
fi
command -v promtool >/dev/null 2>&1 || { echo "the prometheus package installed no promtool on PATH" >&2; exit 1; }
echo "promtool: $(command -v promtool) ($(promtool --version 2>&1 | head -1))"
