# Sourced by the device commands (check.sh, sweep.sh) from the repository root, with PY set: installs the
# carried wheels (.whl/) where mlflow/optuna are missing, puts the repository on PYTHONPATH, and unpacks the
# carried MNIST (.mnist/*.gz) under $1 (torchvision's layout), exporting DFKD_DATA.
if [ -d .whl ] && ! $PY -c "import mlflow, optuna" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/site
  $PY -c "import mlflow, optuna, sqlalchemy, alembic" || { echo "carried wheels incomplete (see the import error)" >&2; exit 3; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .mnist ]; then
  mkdir -p "$1/MNIST/raw"
  for f in .mnist/*.gz; do gunzip -c "$f" > "$1/MNIST/raw/$(basename "$f" .gz)"; done
  export DFKD_DATA=$1
fi
