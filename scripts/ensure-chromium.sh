#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the status page's browser test (tests/browser): Debian's
# chromium and chromium-driver (always the same version), installed with apt-get when either is missing.
# Idempotent: with both in place it only prints the version. Uses sudo only when not root.
set -euo pipefail

if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
  sudo=""
  if [[ "$(id -u)" -ne 0 ]]; then
    sudo="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q chromium chromium-driver
fi
/usr/bin/chromedriver --version
