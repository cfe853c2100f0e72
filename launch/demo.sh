#!/usr/bin/env bash
# The README's first command: set up, pretrain on the embedded digits, then the linear probe.
# Runs offline on a laptop CPU in a few minutes. Extra arguments go to the pretraining command,
# e.g. `bash launch/demo.sh --config.train.epochs=5`.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${WORKDIR:-workdirs/demo}"
bash launch/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
.venv/bin/python -m simclr_jax.main --config=configs/demo.py --workdir="$WORKDIR" "$@"
# The probe on cached, standardised features: the protocol of the raw-pixel baseline, so the
# two floors (random encoder, raw pixels) and the encoder are compared on equal terms.
.venv/bin/python -m simclr_jax.main --config=configs/linear_eval.py \
  --config.pretrain_workdir="$WORKDIR" --workdir="$WORKDIR/eval" --config.baseline=True \
  --config.probe.mode=cached --config.probe.standardise=True
echo "results: $WORKDIR/eval/results.json"
echo "pictures: $WORKDIR/eval/embedding.png $WORKDIR/eval/curves.png"
