#!/usr/bin/env bash
# Debian's chromium + chromium-driver, which the UI's browser test
# (crates/lora-cli/tests/ui_browser.rs) drives over WebDriver. A no-op when
# both are installed; installs them with apt when run as root; otherwise
# says what to install.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "the UI's browser test needs Chromium and its WebDriver: install the Debian packages chromium and chromium-driver" >&2
  exit 1
fi
echo "installing chromium and chromium-driver (the UI's browser test drives them)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
