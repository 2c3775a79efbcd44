#!/usr/bin/env bash
# The test command of the README: a virtual environment with the dev extras, lint, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: pip takes the CPU wheel that lies on disk instead of a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev,browser]"
# The studio's browser test (tests/test_studio_browser.py) drives Debian's Chromium; nothing downloads a browser.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    else
        echo "scripts/test.sh: no chromium and not root: the studio browser test will skip (apt install chromium)" >&2
    fi
fi
.venv/bin/ruff check src tests bench train.py
.venv/bin/python -m pytest -q "$@"
