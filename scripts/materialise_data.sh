#!/usr/bin/env bash
# Make data/ hold exactly the version that data.dvc records.
#   1. data/ already matches data.dvc: nothing to do.
#   2. a DVC remote is configured: `dvc pull data.dvc`.
#   3. otherwise (a fresh machine, no remote): synthesise the embedded default
#      benchmark, whose bytes are a pure function of its preset and seed, and
#      check that its hash is the one data.dvc records.
set -euo pipefail
cd "$(dirname "$0")/.."

matches() {
  # `dvc commit` hashes data/ into the cache and rewrites data.dvc if the hash
  # differs; git then tells us whether it did.
  [[ -d data ]] || return 1
  dvc commit -f -q data.dvc >/dev/null 2>&1 || return 1
  if git diff --quiet -- data.dvc; then
    return 0
  fi
  git checkout -q -- data.dvc
  return 1
}

if matches; then
  echo "data/: matches data.dvc"
  exit 0
fi
if [[ -n "$(dvc remote list 2>/dev/null)" ]]; then
  echo "data/: pulling the version in data.dvc from the DVC remote"
  dvc pull data.dvc
  exit 0
fi
if [[ -d data ]]; then
  echo "error: data/ exists but does not match data.dvc, and no DVC remote is configured." >&2
  echo "       Move it away (or 'dvc add data' and commit, if it is a new version you mean to keep)." >&2
  exit 1
fi
echo "data/: no DVC remote configured; synthesising the embedded default benchmark"
g2p data synth --out data --params params.yaml --quiet
if ! matches; then
  echo "error: the synthesised data does not hash to the version in data.dvc;" >&2
  echo "       the generator or its preset changed without 'dvc add data' being committed." >&2
  exit 1
fi
echo "data/: synthesised, hash matches data.dvc"
