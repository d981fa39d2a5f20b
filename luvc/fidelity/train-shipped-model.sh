#!/usr/bin/env bash
# Trains the shipped fidelity checkpoint again: about 126 minutes on 2 CPU cores, four runs of
# `python -m luvc.fidelity.train`, each deterministic (same command, same losses, step for step).
#   1. 4600 steps from scratch with each training row's questions chained (79 min): charts and
#      counting are learned here, early enough in the LLM for LUVC to keep them.
#   2-3. 1000 steps twice with each question asked alone (16 min each): colour from 65% to 100%
#      on validation. Learned this way from scratch, charts end up read in the last LLM layer.
#   4. 1000 steps more with relation patches weighted 4x in the region loss (16 min).
# --no-speedups: these runs were eager, and the speed-ups change float rounding (and so every later step).
# Usage: luvc/fidelity/train-shipped-model.sh [OUT]  (default: the checkpoint directory beside it)
set -euo pipefail
out=${1:-$(dirname "$0")/checkpoint}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
isolated=(--isolate-from 0 --steps 1000 --lr 5e-4 --warmup 50 --no-speedups)
python -m luvc.fidelity.train --out "$work/chained" --no-speedups
python -m luvc.fidelity.train --init "$work/chained" --out "$work/isolated-1" "${isolated[@]}"
python -m luvc.fidelity.train --init "$work/isolated-1" --out "$work/isolated-2" "${isolated[@]}"
python -m luvc.fidelity.train --init "$work/isolated-2" --out "$out" "${isolated[@]}" --relation-weight 4
