#!/bin/bash
# Prepare what scripts/gpu/check.sh needs on the GPU machine (device README): the wheels of the packages
# its Python lacks (mlflow, optuna and their needs, pinned to this venv's versions, resolved by pip for
# CPython 3.12 on manylinux x86-64; packages the device image already has are dropped) into .whl/, and
# MNIST's .gz files into .mnist/.  Both folders are git-ignored; carry them: carry=[".whl", ".mnist"].
#   bash scripts/gpu/fetch_wheels.sh [path/to/MNIST/raw]      (about 35 MiB of wheels, 12 MiB of MNIST)
set -euo pipefail
cd "$(dirname "$0")/../.."
raw=${1:-../shared/data/MNIST/raw}
py=${PYTHON:-python}
pins=$($py -m pip list --format=freeze 2>/dev/null | grep -iE '^(mlflow|optuna)==' | tr '\n' ' ')
[ -n "$pins" ] || { echo "mlflow/optuna not installed in $py's environment" >&2; exit 2; }
rm -rf .whl && mkdir -p .whl
$py -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl $pins
have=scripts/gpu/device-packages.txt
for f in .whl/*.whl; do
  name=$(basename "$f" | sed -E 's/-[0-9].*//' | tr 'A-Z_' 'a-z-')
  grep -qxF "$name" "$have" && rm "$f"
done
mkdir -p .mnist && cp "$raw"/*.gz .mnist/
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1); MNIST $(du -sh .mnist | cut -f1) (pins: $pins)"
