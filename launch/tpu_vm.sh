#!/usr/bin/env bash
# Cloud TPU VM lifecycle for simclr_jax: create | setup | run | logs | delete.
#
#   launch/tpu_vm.sh create --project=P --zone=us-central2-b --accelerator-type=v4-32 [--spot] [--queued]
#   launch/tpu_vm.sh setup  --project=P --zone=Z          # copy this checkout + venv on every worker
#   launch/tpu_vm.sh run    --project=P --zone=Z --bucket=B [--config=configs/imagenet.py] [-- --config.x=y ...]
#   launch/tpu_vm.sh logs   --project=P --zone=Z [--worker=0]
#   launch/tpu_vm.sh delete --project=P --zone=Z
#
# Every setting is a flag or the env var in capitals (PROJECT, ZONE, TPU_NAME, ACCELERATOR_TYPE,
# RUNTIME_VERSION, BUCKET, CONFIG, RUN_NAME, WORKDIR, TFDS_DATA_DIR, SPOT, QUEUED, WORKER,
# DRY_RUN). --dry-run prints the commands instead of running them. `run` starts the same command
# on every worker; jax.distributed.initialize() finds the other workers itself on TPU VMs.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "error: $*" >&2; exit 2; }

[ $# -ge 1 ] || usage 2
CMD="$1"; shift
case "$CMD" in
  create|setup|run|logs|delete) ;;
  -h|--help) usage 0 ;;
  *) die "unknown sub-command '$CMD' (create|setup|run|logs|delete)" ;;
esac

PROJECT="${PROJECT:-}"; ZONE="${ZONE:-}"; BUCKET="${BUCKET:-}"
TPU_NAME="${TPU_NAME:-simclr-tpu}"; ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/imagenet.py}"; RUN_NAME="${RUN_NAME:-simclr_r50}"
WORKDIR="${WORKDIR:-}"; TFDS_DATA_DIR="${TFDS_DATA_DIR:-}"
SPOT="${SPOT:-0}"; QUEUED="${QUEUED:-0}"; WORKER="${WORKER:-0}"; DRY_RUN="${DRY_RUN:-0}"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --name=*) TPU_NAME="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) RUNTIME_VERSION="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --run-name=*) RUN_NAME="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --tfds-data-dir=*) TFDS_DATA_DIR="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown flag '$1' (see --help; flags for the job go after --)" ;;
  esac
  shift
done

[ -n "$PROJECT" ] || die "no GCP project: pass --project=... or set PROJECT."
[ -n "$ZONE" ] || die "no zone: pass --zone=... (e.g. us-central2-b for v4) or set ZONE."
BUCKET="${BUCKET#gs://}"; BUCKET="${BUCKET%/}"

# Prints the command (args with spaces or quotes in single quotes); runs it unless --dry-run.
run() {
  local a out='+'
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@+%-]*$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  echo "$out"
  [ "$DRY_RUN" = 1 ] || "$@"
}

LOC=(--zone="$ZONE" --project="$PROJECT")
SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}")
LOG='~/simclr_jax.log'

case "$CMD" in
  create)
    spot=(); [ "$SPOT" = 1 ] && spot=(--spot)
    if [ "$QUEUED" = 1 ]; then
      run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${LOC[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
      echo "queued; watch with: gcloud compute tpus queued-resources describe $TPU_NAME ${LOC[*]}"
    else
      run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOC[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
    fi
    ;;
  setup)
    # This checkout's committed tree, on every worker, then a venv with jax[tpu] (matching libtpu).
    cd "$(dirname "$0")/.."
    TARBALL="${TMPDIR:-/tmp}/simclr_jax.tgz"
    run git archive --format=tar.gz -o "$TARBALL" HEAD
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME":simclr_jax.tgz --worker=all "${LOC[@]}"
    remote="rm -rf ~/simclr_jax && mkdir -p ~/simclr_jax && tar xzf ~/simclr_jax.tgz -C ~/simclr_jax"
    remote+=" && cd ~/simclr_jax && bash launch/setup.sh"
    remote+=" && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]>=0.9,<0.11'"
    run "${SSH[@]}" --worker=all --command="$remote"
    ;;
  run)
    [ -n "$BUCKET" ] || die "no bucket: pass --bucket=... or set BUCKET (workdir and TFDS data live on GCS)."
    WORKDIR="${WORKDIR:-gs://$BUCKET/simclr_jax/$RUN_NAME}"
    TFDS_DATA_DIR="${TFDS_DATA_DIR:-gs://$BUCKET/tensorflow_datasets}"
    job="TFDS_DATA_DIR=$TFDS_DATA_DIR nohup .venv/bin/python -m simclr_jax.main --config=$CONFIG --workdir=$WORKDIR"
    for a in ${EXTRA[@]+"${EXTRA[@]}"}; do job+=" $(printf '%q' "$a")"; done
    # Same command on every worker, detached; the job resumes from WORKDIR if restarted.
    run "${SSH[@]}" --worker=all --command="cd ~/simclr_jax && $job > $LOG 2>&1 < /dev/null &"
    echo "started on all workers of $TPU_NAME; workdir $WORKDIR. Follow with: $0 logs ${LOC[*]}"
    ;;
  logs)
    run "${SSH[@]}" --worker="$WORKER" --command="tail -n 200 -F $LOG"
    ;;
  delete)
    if [ "$QUEUED" = 1 ]; then
      run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOC[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOC[@]}" --quiet
    fi
    ;;
esac
