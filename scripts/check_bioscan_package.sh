#!/usr/bin/env bash
# Does the official bioscan-dataset package read a synthetic root as the real one?
#
#   bash scripts/check_bioscan_package.sh [ROOT]
#
# Builds (once) a separate venv, $BIOSCAN_VENV (default /tmp/bioscan-venv), with
# bioscan-dataset 1.3.0 and a torch/torchvision pair that work together: the
# project's CPU torch wheel cannot host PyPI's torchvision (its C++ ops link
# against the CUDA build, and `import torchvision` fails), so this venv takes
# PyPI's torch 2.14.1 + torchvision 0.29.1 (CUDA builds; they run on a CPU).
# About 80 s and 5.6 GB where pip's caches are warm. Without ROOT, a tiny root
# (with other_heldout records) is synthesised into a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_MAIN=${PY_MAIN:-.venv/bin/python}
VENV=${BIOSCAN_VENV:-/tmp/bioscan-venv}
STAMP="$VENV/.g2p-bioscan-dataset-1.3.0-torch-2.14.1"

if [ ! -f "$STAMP" ]; then
    start=$(date +%s)
    base=$("$PY_MAIN" -c 'import sys; print(sys._base_executable)')
    rm -rf "$VENV"
    "$base" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "bioscan-dataset==1.3.0" \
        2>&1 | grep -v "is ignored" || true
    "$VENV/bin/python" -c "import bioscan_dataset, torchvision" 
    touch "$STAMP"
    echo "built $VENV in $(( $(date +%s) - start )) s"
fi

ROOT=${1:-}
if [ -z "$ROOT" ]; then
    ROOT=$(mktemp -d /tmp/g2p-bioscan-root.XXXXXX)
    trap 'rm -rf "$ROOT"' EXIT
    "$PY_MAIN" - "$ROOT" <<'PY'
import dataclasses, sys
from g2p.config import preset
from g2p.data.synth import synthesise
cfg = dataclasses.replace(preset("tiny").data, heldout_species_per_genus=1, other_heldout_per_species=2)
synthesise(sys.argv[1], cfg)
PY
fi
"$VENV/bin/python" scripts/check_bioscan_package.py "$ROOT"
