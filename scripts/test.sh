#!/usr/bin/env bash
# The test command: builds its own venv from nothing, installs the project, runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-test}"
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "warning: could not install dataset-fashion-mnist; its tests will be skipped" >&2
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -c constraints.txt torch==2.13.0
"$VENV/bin/pip" install -q -c constraints.txt -e ".[test]"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
