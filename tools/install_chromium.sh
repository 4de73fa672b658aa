#!/usr/bin/env bash
# Install what the headless viewer test needs: Debian's chromium and Playwright for Python (driver only).
# Idempotent; never runs `playwright install` (browser downloads cannot work here: the test uses /usr/bin/chromium).
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium
fi
if ! python -c "import playwright.sync_api" >/dev/null 2>&1; then
  python -m pip install -q playwright
fi
chromium --version 2>/dev/null
