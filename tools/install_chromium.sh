#!/usr/bin/env bash
# Install Debian's chromium for the HTML book's browser test (`make check-html`), unless one is there.
# It comes from the distribution's package registry: no browser is downloaded by Playwright.
set -euo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_chromium: no chromium and no apt-get: install Chromium with your system's package manager" >&2
  exit 2
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "install_chromium: installing chromium needs root: run 'apt-get install chromium' as root" >&2
    exit 2
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends chromium \
  || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends chromium; }
