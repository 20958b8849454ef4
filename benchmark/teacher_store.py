"""One teacher for every machine: cached teachers kept in the MLflow tracking store's artifacts.

``dfkd-bench teachers push`` logs a cached teacher (``weights.pt`` + ``manifest.json``, its sha256
checked first) as a FINISHED run of the experiment :data:`EXPERIMENT`, tagged with dataset, arch
and sha256.  A machine that lacks the teacher a grid uses downloads it from there (checksum
verified against the manifest and the tag) instead of training its own, so that cells distilled
on two machines distil from the same weights.  Works with a server (``http://...``) and with a
local store alike.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from methods.core.errors import DfkdError

from . import tracking
from .teachers import sha256_of, teacher_dir, verified_manifest

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

EXPERIMENT = "dfkd-teachers"
SHA256 = "dfkd.teacher.sha256"
FOLDER = "teacher"  # artifact folder holding weights.pt and manifest.json


def push_command(dataset: str, arch: str) -> str:
    return f"dfkd-bench teachers push --dataset {dataset} --arch {arch} --tracking-uri URI"


def find(client: MlflowClient, dataset: str, arch: str, sha256: str | None = None) -> Run | None:
    """The latest FINISHED pushed teacher ``dataset/arch`` (with that sha256 if given), else ``None``."""
    exp = tracking.find_experiment(client, EXPERIMENT)
    if exp is None:
        return None
    query = (f"tags.`{tracking.KIND}` = 'teacher' and tags.dataset = '{dataset}' and tags.arch = '{arch}' "
             "and attributes.status = 'FINISHED'")
    if sha256 is not None:
        query += f" and tags.`{SHA256}` = '{sha256}'"
    runs = tracking.search(client, exp, query)
    return max(runs, key=lambda r: r.info.start_time) if runs else None


def push(client: MlflowClient, results: Path, dataset: str, arch: str) -> tuple[str, dict[str, Any], bool]:
    """Store the cached teacher in the tracking store; returns (run id, manifest, whether it was new)."""
    manifest = verified_manifest(results, dataset, arch)
    found = find(client, dataset, arch, manifest["sha256"])
    if found is not None:
        return found.info.run_id, manifest, False
    from mlflow.entities import Param, RunTag

    exp = tracking.ensure_experiment(client, EXPERIMENT, results, client.tracking_uri)
    run = client.create_run(exp, run_name=tracking.teacher_id(manifest), tags={
        tracking.KIND: "teacher", "dataset": dataset, "arch": arch, SHA256: manifest["sha256"],
        "dfkd.teacher_id": tracking.teacher_id(manifest)})
    run_id = run.info.run_id
    try:
        params = {"test_accuracy": manifest["test_accuracy"], "val_accuracy": manifest["val_accuracy"],
                  "seed": manifest["seed"], "epochs": manifest["recipe"]["epochs"], "torch": manifest["torch"]}
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag("created", str(manifest["created"]))])
        folder = teacher_dir(results, dataset, arch)
        for name in ("weights.pt", "manifest.json"):
            client.log_artifact(run_id, str(folder / name), FOLDER)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id, manifest, True


def pull(client: MlflowClient, results: Path, dataset: str, arch: str, sha256: str) -> dict[str, Any]:
    """Download pushed teacher ``dataset/arch@sha256`` into the cache (checksum verified); returns its manifest."""
    run = find(client, dataset, arch, sha256)
    if run is None:
        raise DfkdError(f"teacher {dataset}/{arch}@{sha256[:12]} is neither cached here nor in the tracking store "
                        f"{client.tracking_uri}; push it from the machine that has it: {push_command(dataset, arch)}")
    target = teacher_dir(results, dataset, arch)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per event in the runner's log
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{arch}.pull-") as tmp:
        local = Path(client.download_artifacts(run.info.run_id, FOLDER, tmp))
        manifest = json.loads((local / "manifest.json").read_text())
        got = sha256_of(local / "weights.pt")
        if not (got == manifest.get("sha256") == sha256):
            raise DfkdError(f"checksum mismatch for teacher {dataset}/{arch} downloaded from run {run.info.run_id}: "
                            f"weights {got[:12]}, manifest {str(manifest.get('sha256'))[:12]}, expected {sha256[:12]}; "
                            f"push it again: {push_command(dataset, arch)}")
        try:
            os.rename(local, target)  # atomic; fails when another worker on this machine pulled it meanwhile
        except OSError:
            if not target.exists():
                raise
    return verified_manifest(results, dataset, arch)


# ----------------------------------------------------------------------------- the grid's teachers
FIXED = "dfkd.teacher."  # experiment tag dfkd.teacher.<dataset>/<arch> = sha256, set by the grid's first invocation


def fixed_teachers(client: MlflowClient, grid: str) -> dict[tuple[str, str], str]:
    """(dataset, arch) → sha256 of the teachers grid ``grid``'s experiment is fixed to (read only)."""
    found = client.get_experiment_by_name(grid)
    if found is None:
        return {}
    fixed = {}
    for key, value in found.tags.items():
        if key.startswith(FIXED) and "/" in key:
            dataset, arch = key[len(FIXED):].split("/", 1)
            fixed[(dataset, arch)] = value
    return fixed


def _cached(results: Path, dataset: str, arch: str) -> dict[str, Any] | None:
    if not (teacher_dir(results, dataset, arch) / "manifest.json").is_file():
        return None
    return verified_manifest(results, dataset, arch)


def mismatch(dataset: str, arch: str, local: str, grid: str, want: str, why: str, results: Path) -> DfkdError:
    folder = teacher_dir(results, dataset, arch)
    return DfkdError(f"the cached teacher {dataset}/{arch}@{local[:12]} ({folder}) differs from grid {grid}'s teacher "
                     f"@{want[:12]} ({why}); cells must not mix teachers: move {folder} aside to pull the grid's "
                     "teacher, or give the grid another name")


def resolve(teachers: list[tuple[str, str]], results: Path, client: MlflowClient, grid: str,
            echo: Any = print) -> dict[tuple[str, str], str | None]:
    """Which teacher (sha256) each (dataset, arch) of grid ``grid`` uses, pulling it when this machine lacks it.

    The teacher the grid's first invocation fixed; else the latest one pushed to the tracking
    store; else this machine's cached one.  ``None``: none of these (the runner trains it).  A
    cached teacher that differs from the fixed or pushed one is refused before anything is written.
    """
    fixed = fixed_teachers(client, grid)
    out: dict[tuple[str, str], str | None] = {}
    for dataset, arch in teachers:
        local = _cached(results, dataset, arch)
        want, why = fixed.get((dataset, arch)), "fixed by the grid's first invocation"
        if want is None:
            pushed = find(client, dataset, arch)
            want, why = (pushed.data.tags[SHA256], "pushed to the tracking store") if pushed else (None, "")
        if want is None:
            out[(dataset, arch)] = local["sha256"] if local else None
            continue
        if local is None:
            echo(f"pulling teacher {dataset}/{arch}@{want[:12]} from the tracking store ({why})")
            pull(client, results, dataset, arch, want)
        elif local["sha256"] != want:
            raise mismatch(dataset, arch, local["sha256"], grid, want, why, results)
        out[(dataset, arch)] = want
    return out


def fix(client: MlflowClient, experiment_id: str, grid: str, shas: dict[tuple[str, str], str],
        results: Path) -> None:
    """Record on the grid's experiment the teachers it did not record yet; refuse if another invocation
    recorded different ones meanwhile."""
    fixed = fixed_teachers(client, grid)
    for (dataset, arch), sha in shas.items():
        if (dataset, arch) not in fixed:
            client.set_experiment_tag(experiment_id, f"{FIXED}{dataset}/{arch}", sha)
    fixed = fixed_teachers(client, grid)
    for (dataset, arch), sha in shas.items():
        if fixed.get((dataset, arch)) != sha:
            raise mismatch(dataset, arch, sha, grid, fixed.get((dataset, arch), "?"),
                           "fixed by another invocation just now", results)
