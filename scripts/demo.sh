#!/usr/bin/env bash
# The main job: builds its own venv from nothing, installs the project, runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-demo}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -c constraints.txt torch==2.13.0
"$VENV/bin/pip" install -q -c constraints.txt -e ".[plots]"
exec "$VENV/bin/flashar-adapt" demo "$@"
