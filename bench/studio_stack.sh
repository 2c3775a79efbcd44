#!/usr/bin/env bash
# Install time and size of the studio's candidate stacks (and of the browser-test clients), each into a fresh
# virtual environment with pip's cache off. Size = the venv's growth in MB. Prints one line per candidate.
#   bash bench/studio_stack.sh        (works in a temporary folder; needs network access to PyPI)
set -u
cd "$(mktemp -d)"
for spec in "gradio" "fastapi uvicorn" "starlette uvicorn" "playwright" "selenium"; do
  name=$(echo $spec | tr ' ' '+')
  rm -rf v_$name; python3 -m venv v_$name
  base=$(du -sm v_$name | cut -f1)
  t0=$(date +%s.%N)
  v_$name/bin/pip install -q --no-cache-dir $spec > log_$name 2>&1
  t1=$(date +%s.%N)
  size=$(du -sm v_$name | cut -f1)
  n=$(( $(v_$name/bin/pip list 2>/dev/null | tail -n +3 | wc -l) - 2 ))  # less pip and setuptools
  echo "$spec | $(echo "$t1 - $t0" | bc) s | $((size-base)) MB | $n packages added | $(v_$name/bin/pip list 2>/dev/null | grep -i -E "^($(echo $spec | tr ' ' '|')) " | tr -s ' ' | tr '\n' ';')"
done
