#!/usr/bin/env bash
# The test command of the README: a virtual environment with the dev extras, lint, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: pip takes the CPU wheel that lies on disk instead of a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/ruff check src tests bench train.py
.venv/bin/python -m pytest -q "$@"
