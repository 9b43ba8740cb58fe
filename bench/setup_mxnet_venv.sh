#!/usr/bin/env bash
# Build Apache MXNet 1.9.1's own virtual environment for the benchmark peer
# (bench/mxnet_peer.py). MXNet is a benchmark peer, never a paratrain dependency,
# so it lives apart in bench/.venv-mxnet (gitignored via .venv*).
# Usage: bash bench/setup_mxnet_venv.sh [python-executable]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python_bin="${1:-python3}"
venv="$here/.venv-mxnet"
"$python_bin" -m venv "$venv"
"$venv/bin/pip" install --quiet "numpy==1.23.5" "mxnet==1.9.1"
"$venv/bin/python" -c "import mxnet, numpy; print('mxnet', mxnet.__version__, 'numpy', numpy.__version__)"
