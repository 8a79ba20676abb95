#!/usr/bin/env bash
# The main job: builds its own venv from nothing, installs the project, runs the demo.
# Installs what every demo option needs (--retrain trains, so the training extras too).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
VENV="${VENV:-.venv-demo}"
ensure_fashion_mnist
make_venv "$VENV" "plots,train"
exec "$VENV/bin/flashar-adapt" demo "$@"
