# Sourced by scripts/test.sh and scripts/demo.sh: the one place that makes a fresh machine ready.
# Both commands must work from nothing, so neither may rely on what the other installed.

# The Fashion-MNIST idx files (a Debian package). Installed when we are root with apt;
# otherwise the demo's own pre-flight check names the command that fixes it.
ensure_fashion_mnist() {
  local dir="${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}"
  [ -f "$dir/t10k-images-idx3-ubyte.gz" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Fashion-MNIST (apt-get install dataset-fashion-mnist) ..." >&2
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "warning: could not install dataset-fashion-mnist" >&2
  fi
}

# make_venv DIR EXTRAS: a venv with torch pinned first (constraints.txt: a CPU wheel lies on
# local disk; peft/accelerate installed before torch would pull a multi-GB CUDA build).
make_venv() {
  local venv="$1" extras="$2"
  if [ -x "$venv/bin/python" ]; then
    echo "checking the installation in $venv (pip; seconds) ..." >&2
  else
    echo "creating $venv and installing torch and the project (pip; a few minutes the first time) ..." >&2
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -c constraints.txt torch==2.13.0
  "$venv/bin/pip" install -q -c constraints.txt -e ".[$extras]"
}
