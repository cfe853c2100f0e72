#!/usr/bin/env bash
# Submits launch/slurm.sbatch with the cluster shape and job settings as flags (or env vars).
#
#   launch/slurm_submit.sh --workdir=/shared/runs/r50 [--nodes=2] [--gpus-per-node=8]
#       [--per=gpu|node] [--partition=P] [--account=A] [--time=48:00:00]
#       [--config=configs/imagenet.py] [--tfds-data-dir=/shared/tensorflow_datasets]
#       [--dry-run] [-- --config.train.epochs=1000 ...]
#
# Env equivalents: WORKDIR NODES GPUS_PER_NODE PER PARTITION ACCOUNT TIME CONFIG TFDS_DATA_DIR.
# --per=gpu runs one process per GPU (ntasks-per-node = GPUs), --per=node one per node.
set -euo pipefail
die() { echo "error: $*" >&2; exit 2; }

WORKDIR="${WORKDIR:-}"; NODES="${NODES:-2}"; GPUS_PER_NODE="${GPUS_PER_NODE:-8}"; PER="${PER:-gpu}"
PARTITION="${PARTITION:-}"; ACCOUNT="${ACCOUNT:-}"; TIME="${TIME:-48:00:00}"
CONFIG="${CONFIG:-configs/imagenet.py}"; TFDS_DATA_DIR="${TFDS_DATA_DIR:-}"; DRY_RUN="${DRY_RUN:-0}"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir=*) WORKDIR="${1#*=}" ;;
    --nodes=*) NODES="${1#*=}" ;;
    --gpus-per-node=*) GPUS_PER_NODE="${1#*=}" ;;
    --per=*) PER="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --tfds-data-dir=*) TFDS_DATA_DIR="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown flag '$1' (see --help; flags for the job go after --)" ;;
  esac
  shift
done
[ -n "$WORKDIR" ] || die "no workdir: pass --workdir=... (shared storage every node sees) or set WORKDIR."
case "$PER" in gpu) TASKS="$GPUS_PER_NODE" ;; node) TASKS=1 ;; *) die "--per=$PER must be 'gpu' or 'node'." ;; esac
[[ "$NODES" =~ ^[1-9][0-9]*$ && "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--nodes and --gpus-per-node must be positive integers."

cd "$(dirname "$0")/.."
ARGS=(--nodes="$NODES" --ntasks-per-node="$TASKS" --gpus-per-node="$GPUS_PER_NODE" --time="$TIME")
[ -n "$PARTITION" ] && ARGS+=(--partition="$PARTITION")
[ -n "$ACCOUNT" ] && ARGS+=(--account="$ACCOUNT")
ENV=(WORKDIR="$WORKDIR" CONFIG="$CONFIG" PER="$PER")
[ -n "$TFDS_DATA_DIR" ] && ENV+=(TFDS_DATA_DIR="$TFDS_DATA_DIR")
TAIL=(); [ ${#EXTRA[@]} -gt 0 ] && TAIL=(-- "${EXTRA[@]}")

echo "+ ${ENV[*]} sbatch ${ARGS[*]} launch/slurm.sbatch ${TAIL[*]+${TAIL[*]}}"
if [ "$DRY_RUN" = 1 ]; then
  # What each allocation would run (its srun line), for the same settings.
  env "${ENV[@]}" bash launch/slurm.sbatch --dry-run ${TAIL[@]+"${TAIL[@]}"}
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node (or use --dry-run)."
env "${ENV[@]}" sbatch "${ARGS[@]}" launch/slurm.sbatch ${TAIL[@]+"${TAIL[@]}"}
