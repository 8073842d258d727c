#!/usr/bin/env bash
# Install the real Dynamo 1.6.1 frontend (python -m dynamo.frontend) into its own venv.
#
# `pip install ai-dynamo==1.6.1` cannot complete without NVIDIA's package index
# (its dependency aisimulate is a stub that downloads at build time), and nothing
# the frontend does imports aisimulate. So: the two wheels without dependencies,
# then their declared dependencies minus aisimulate, pinned by the constraints file.
#
# usage: install-dynamo-frontend.sh [VENV_DIR]   (default .venv-dynamo)
set -euo pipefail
venv="${1:-.venv-dynamo}"
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q --no-deps ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1
"$venv/bin/python" -m pip install -q -c "$here/dynamo-frontend-constraints.txt" \
  "pydantic>=2.10.6,<=2.13.5" "uvloop>=0.21.0" "aiohttp<4.0,>=3.14.3" \
  "certifi>=2026.10.19" "kubernetes<33.0.0,>=32.0.1" "msgspec>=0.19.0" \
  "prometheus-client<1.0,>=0.23.1" "pyzmq>=26.0.0" "redis<9.0.0,>=6.2.0" "tqdm>=4.0.0" \
  "transformers>=4.56.0" "typing-extensions>=4.10.0" "zstandard<1.0,>=0.23.0"
"$venv/bin/python" -c "import dynamo.frontend" 2>/dev/null || {
  echo "dynamo.frontend does not import from $venv" >&2; exit 1; }
echo "Dynamo 1.6.1 frontend installed in $venv"
