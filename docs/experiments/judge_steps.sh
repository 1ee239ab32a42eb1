#!/usr/bin/env bash
# The judge's training length, chosen on val (issue 15): train_judge alone with one params change,
# in a scratch folder that links this checkout's outputs/prepared/train, outputs/validation and data
# (run `dvc repro train_judge` first), and print the val / val_unseen retrieval it measures.
#
#   docs/experiments/judge_steps.sh steps2400 "p['train_judge']['steps'] = 2400"
#
# Results (2026-12-05, default benchmark, 2 cores; the stage's own val metrics, test never read):
#   steps  seen_all_top1  unseen_all_top1  (among all 144 species; val 288 / val_unseen 216 images)
#    600       0.351          0.213          (the old default: metrics/train_judge.json before)
#   2400       0.931          0.787
#   4800       0.986          0.958          -> the default (train 4.5 min)
set -euo pipefail
name=$1; change=$2
ROOT=$(cd "$(dirname "$0")/../.." && pwd); W=${WORK:-/tmp/judge-steps}/$name
rm -rf "$W"; mkdir -p "$W/outputs/validation" "$W/outputs/prepared"
ln -s "$ROOT/outputs/prepared/train" "$W/outputs/prepared/train"
ln -s "$ROOT/outputs/validation/valid.parquet" "$W/outputs/validation/valid.parquet"
ln -s "$ROOT/data" "$W/data"
python - "$ROOT/params.yaml" "$W/params.yaml" <<P
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
$change
open(sys.argv[2], "w").write(yaml.safe_dump(p, sort_keys=False))
P
cd "$W"
PYTHONPATH=$ROOT MLFLOW_TRACKING_URI=sqlite:///$W/mlflow.db RAY_ADDRESS= python -m pipelines.train_judge \
  --stage train_judge --data outputs/prepared/train --valid outputs/validation/valid.parquet --root data \
  --out models/judge --metrics-dir metrics --plots-dir metrics/plots > log.txt 2>&1
python -c "import json; r = json.load(open('metrics/train_judge.json'))['retrieval']; \
print('$name', {k: round(v, 3) for k, v in r.items() if k.endswith('top1')})"
