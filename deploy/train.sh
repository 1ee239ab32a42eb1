#!/usr/bin/env bash
# The RayJob's entrypoint (deploy/rayjob.yaml): the training pipeline, `dvc repro`, on the RayJob's cluster.
#
# Ray runs it on the head pod, in the job's working_dir (the repository archive of runtimeEnvYAML) and
# its pip environment, with RAY_ADDRESS set: every stage joins this cluster (pipelines/ray_env.py), its
# Ray Data and Ray Train workers run on the GPU worker group, prepared shards, latents and checkpoints go
# to G2P_STORAGE_PATH (ray.storage_path), runs and the registered model to MLFLOW_TRACKING_URI.
set -euo pipefail
: "${G2P_STORAGE_PATH:?set it (runtimeEnvYAML env_vars) to an S3 prefix, e.g. s3://my-bucket/g2p}"
: "${MLFLOW_TRACKING_URI:?set it (runtimeEnvYAML env_vars) to the MLflow server, e.g. http://mlflow:5000}"

# The `g2p` command of the stages, from this copy of the code (the pins are already installed).
python -m pip install -q --no-deps --no-build-isolation -e .
# An archive has no .git: DVC runs without SCM in this scratch copy (lineage tags then say so).
[ -d .git ] || dvc config --local core.no_scm true
# The cluster's settings for this run: storage on S3, GPUs for training and latent encoding.
python - "$G2P_STORAGE_PATH" "${G2P_USE_GPU:-true}" <<'PY'
import sys
import yaml

params = yaml.safe_load(open("params.yaml"))
params["ray"]["storage_path"] = sys.argv[1]
params["ray"]["use_gpu"] = sys.argv[2] == "true"
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
PY
dvc pull data.dvc   # the data version data.dvc names, from the DVC remote in .dvc/config (README: DVC remotes)
dvc repro           # validate -> ... -> register (+ the promotion gate: reports/promotion.json)
cat reports/promotion.json
