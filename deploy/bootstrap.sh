#!/bin/sh
# Create the data folders, the work pools and the "gpu" concurrency limit, then deploy every flow of deploy/prefect.yaml
# and write each named recipe's sections into the parameters of the deployments that name it.
# Idempotent: run it again after changing the yaml or a pool template.
#
#   PREFECT_API_URL=http://prefect:4200/api BRATS_REPO=/opt/brats BRATS_DATA=/data BRATS_STORAGE=/data \
#       deploy/bootstrap.sh
#
# BRATS_GPU_POOL_TYPE: process (default: flow runs are processes on the worker's machine, as on one GPU
# machine), or docker / kubernetes with deploy/work-pools/gpu-<type>.json as the base job template;
# their workers need `pip install prefect-docker` / `pip install prefect-kubernetes`.
set -eu

cd "$(dirname "$0")/.."
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
: "${BRATS_REPO:=$(pwd)}"
: "${BRATS_DATA:?set BRATS_DATA to the data folder every worker sees (raw/, inbox/, segmentations/)}"
: "${BRATS_STORAGE:=$BRATS_DATA}"
export BRATS_REPO BRATS_DATA BRATS_STORAGE
PREFECT="${PREFECT:-prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"

# the folders the deployments read and write: raw/ (labelled cases, nightly ingestion), inbox/ (new
# scans, `brats watch`), segmentations/ (what inference writes)
mkdir -p "$BRATS_DATA/raw" "$BRATS_DATA/inbox" "$BRATS_DATA/segmentations" "$BRATS_STORAGE"
GPU_TYPE="${BRATS_GPU_POOL_TYPE:-process}"

"$PREFECT" work-pool create cpu --type process --overwrite
if [ "$GPU_TYPE" = process ]; then
    "$PREFECT" work-pool create gpu --type process --overwrite
else
    "$PREFECT" work-pool create gpu --type "$GPU_TYPE" --base-job-template "deploy/work-pools/gpu-$GPU_TYPE.json" --overwrite
fi
# task runs tagged "gpu" (the train-model task): one at a time across all workers
"$PREFECT" concurrency-limit create gpu "${BRATS_GPU_SLOTS:-1}"
"$PREFECT" --no-prompt deploy --all --prefect-file deploy/prefect.yaml
# a deployment that names a recipe gets its sections written into its parameters, so the UI's run
# form shows and submits the recipe (flows/cli/deployments.py)
"${PYTHON:-python}" -m flows.cli.deployments
