#!/usr/bin/env bash
# Install everything the project needs on a fresh Debian/Ubuntu machine (or a venv).
#   bash scripts/install.sh          # to run experiments
#   bash scripts/install.sh --test   # also the test tools
# Respects $PYTHON (default python3). Idempotent: installed parts are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# redis-server: local mode starts a private one; the tests start their own.
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends redis-server
  else
    echo "install.sh: redis-server is missing and apt-get is not available;" \
         "install Redis (>= 6) with your package manager (macOS: brew install redis)." >&2
    exit 1
  fi
fi

# chromium (tests only): the Flower browser test drives Debian's /usr/bin/chromium through
# Playwright; no browser is ever downloaded from the internet.
if [ -n "$extras" ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium
  else
    echo "install.sh: /usr/bin/chromium is missing and apt-get is not available;" \
         "install Chromium there (the browser test of Flower needs it)." >&2
    exit 1
  fi
fi

# torch before anything else, pinned: on a CPU machine `torch==2.13.0` resolves to the
# local CPU wheel; letting another package pull an unpinned torch would download
# gigabytes of CUDA libraries. On a GPU machine install the CUDA build you need first.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0
fi

"$PY" -m pip install -q -e ".${extras}"

# The project's bytecode, compiled now: an editable install leaves it to the first
# import, and where PYTHONDONTWRITEBYTECODE is set (many containers, these machines)
# every `orchestrator` command and worker start compiled ~55 modules again: 0.05-0.15 s
# each (benchmarks/startup.py). checked-hash: a file edited later is noticed by its
# content and compiled in memory as before, never run stale.
"$PY" -m compileall -q --invalidation-mode checked-hash orchestrator tasks celeryconfig.py
