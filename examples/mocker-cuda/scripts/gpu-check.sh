#!/usr/bin/env bash
# GPU check of the mocker engine (see scripts/gpu_check.py): conformance kit plus a short
# bounded load with --device cuda; asserts the GPU was used and prints step-time figures.
# Exits 2 with a clear message on a machine without an NVIDIA GPU; --allow-cpu for a dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" scripts/gpu_check.py "$@"
