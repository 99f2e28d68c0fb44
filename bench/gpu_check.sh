#!/usr/bin/env bash
# The one-command GPU check (issue 9); see bench/gpu_check.py for the phases and options.
#   bash bench/gpu_check.sh [--phases smoke,speed,train] [--presets pr76,...] [--out-dir DIR] [--dry-run]
# The device image has torch and sentencepiece but no zstandard (train_gpt imports it): install the
# wheel carried in .whl/ (bench/SPEED.md says how to fetch it), then hand over to the Python helper.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import zstandard" 2>/dev/null; then
  if ! ls .whl/zstandard-*.whl >/dev/null 2>&1; then
    echo "gpu_check: FAILED at setup: zstandard is not installed and no .whl/zstandard-*.whl was carried" >&2
    exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_check.py "$@"
