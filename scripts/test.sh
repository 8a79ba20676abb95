#!/usr/bin/env bash
# The test command: builds its own venv from nothing, installs the project, checks lint and
# formatting with ruff, runs the suite.
# With no arguments it also re-runs the numerically sensitive tests (marker `numerics`) under
# a second kernel dispatch and thread count, so a tolerance fitted to one CPU fails here
# rather than on someone else's machine. With arguments, they go to pytest alone.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
VENV="${VENV:-.venv-test}"
ensure_fashion_mnist
make_venv "$VENV" test
PY="$VENV/bin/python"
if [ $# -gt 0 ]; then
  exec "$PY" -m pytest -q -p no:cacheprovider "$@"
fi
echo "ruff: lint and format check (pyproject.toml [tool.ruff])"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$PY" -m pytest -q -p no:cacheprovider tests
echo "numerics variant: ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 (the suite above ran with this CPU's best kernels)"
ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider -m numerics tests
