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
# tests/test_render.py renders with FluidSynth and the General MIDI soundfont. Under CI=true both tests fail when
# these are missing; elsewhere they skip.
apt_needs=()
command -v chromium >/dev/null 2>&1 || apt_needs+=(chromium)
command -v fluidsynth >/dev/null 2>&1 || apt_needs+=(fluidsynth)
[ -e /usr/share/sounds/sf2/FluidR3_GM.sf2 ] || apt_needs+=(fluid-soundfont-gm)
if [ ${#apt_needs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${apt_needs[@]}"
    else
        echo "scripts/test.sh: missing ${apt_needs[*]} and not root: their tests will skip (apt install ${apt_needs[*]})" >&2
    fi
fi
.venv/bin/ruff check src tests bench train.py
# The layers contract of pyproject.toml: no import cycle, nothing imports a layer above it.
.venv/bin/lint-imports
.venv/bin/python -m pytest -q "$@"
