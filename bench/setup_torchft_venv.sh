#!/usr/bin/env bash
# Build torchft 0.2.0's own virtual environment for the benchmark peer
# (bench/torchft_peer.py). torchft is a benchmark peer, never a paratrain dependency,
# so it lives apart in bench/.venv-torchft (gitignored). The venv sees the system's
# site-packages so it reuses the installed torch (2.13.0) instead of pulling another;
# the script refuses to go on if pip would replace it.
# Usage: bash bench/setup_torchft_venv.sh [python-executable]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python_bin="${1:-python3}"
venv="$here/.venv-torchft"
"$python_bin" -m venv --system-site-packages "$venv"
torch_before="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
if "$venv/bin/pip" install --dry-run "torchft==0.2.0" 2>&1 | grep -E "Would install.* torch-[0-9]" >/dev/null; then
    echo "pip would replace torch $torch_before: installing torchft without its dependencies" >&2
    "$venv/bin/pip" install --quiet --no-deps "torchft==0.2.0"
    "$venv/bin/pip" install --quiet "opentelemetry-api>=1.39.0" "opentelemetry-sdk>=1.39.0" \
        "opentelemetry-exporter-otlp-proto-http>=1.39.0"
else
    "$venv/bin/pip" install --quiet "torchft==0.2.0"
fi
"$venv/bin/python" -c "import torch, torchft; print('torchft 0.2.0 with torch', torch.__version__)"
test "$("$venv/bin/python" -c 'import torch; print(torch.__version__)')" = "$torch_before"
