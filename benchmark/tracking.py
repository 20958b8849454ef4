"""MLflow tracking: where runs are stored, what a cell run records, and finding runs again.

Schema (read by the plots / tables / tuning commands; change it here and there together):

* one experiment per grid, named after the grid (``default`` for the built-in grid), tagged
  ``dfkd.teacher.<dataset>/<arch>`` = sha256 by the grid's first invocation (every later cell must
  use that teacher, :mod:`benchmark.teacher_store`); pushed teachers live in experiment ``dfkd-teachers``;
* a parent run per ``dfkd-bench run`` invocation: tag ``dfkd.kind=grid``;
* a child run per cell: tags ``mlflow.parentRunId``, ``dfkd.kind=cell``, ``dfkd.cell_id`` and
  ``method``, ``dataset``, ``budget`` (collected count), ``seed``, ``pair`` (``teacher->student``),
  ``profile``; params ``hp.<name>`` (every hyperparameter after defaults, profile, overrides and
  budget), ``method``, ``dataset``, ``teacher``, ``student``, ``profile``, ``seed``,
  ``budget.collected|source|balanced|iterations|batch_size``, ``teacher_id``
  (``dataset/arch@sha256[:12]``), ``teacher_sha256`` (also tag ``dfkd.teacher.sha256``), ``teacher_test_accuracy``, ``code_version``; metrics at each
  evaluation with step = iteration (``val_accuracy``, ``best_val_accuracy``, ``loss/<name>``,
  ``teacher_images``, ``wall_seconds``) and final ones at step = iterations (``test_accuracy``,
  ``best_val_test_accuracy``, ``best_val_accuracy``, ``teacher_accuracy``, ``teacher_images``,
  ``wall_seconds``); artifacts ``cell.yaml``, ``student.pt`` (``predictor`` and
  ``best_predictor`` state dicts), ``samples.png`` when the method adds samples, ``error.txt``
  when the cell failed.  Status FINISHED, FAILED (error, non-finite loss) or KILLED
  (interrupted, or found stale when the grid resumed).

The MLflow UI opens on the comparison: every experiment carries ``mlflow.experimentKind =
custom_model_development`` (MLflow 3 then opens the runs page, not the GenAI overview) and two
shared views (``mlflow.sharedViewState.<key>`` experiment tags, the UI's "share view" format):
``dfkd-cells`` (the cell runs as a flat table with the compared metrics as columns) and
``dfkd-by-group`` (the same runs grouped by the ``group`` tag: mean over seeds, min/max in the
grouping menu).  :func:`runs_page_url` is the address of either.  A cell run also carries tags
``variant`` (the grid entry's overrides, ``key=value,...``, or ``base``) and ``group`` (its name
without the seed, plus the variant).

The default store is SQLite under the results folder (``sqlite:///<results>/mlflow.db``, artifacts
in ``<results>/mlartifacts``), never the deprecated ``./mlruns`` file store; ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` points at a server instead.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from methods.core.context import BaseCallback
from methods.core.errors import DfkdError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from methods.core.api import DistillResult

    from .grid import Cell, Plan

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
KIND = "dfkd.kind"
CELL_ID = "dfkd.cell_id"
PARENT = "mlflow.parentRunId"
HEARTBEAT = "dfkd.heartbeat"
HEARTBEAT_INTERVAL = "dfkd.heartbeat_interval"
QUEUE_STUDY = "dfkd.queue.study"
QUEUE_TRIAL = "dfkd.queue.trial"
BATCH = 100  # MLflow's per-request limit for params and tags
# MLflow 3 picks the experiment page's layout from this tag (values in its UI: genai_development,
# custom_model_development); without it a new experiment opens on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # the UI's "share view": ?viewStateShareKey=<key>
VIEW_CELLS = "dfkd-cells"
VIEW_GROUPED = "dfkd-by-group"
GROUP = "group"
VARIANT = "variant"
# What a reader compares, as runs-table columns (final metrics of every cell; the accounting ones
# are logged by the harness, spec §1.5 / issue 11).  Absent metrics simply show no column.
COMPARED_METRICS = (
    "test_accuracy", "best_val_test_accuracy", "teacher_accuracy", "train_flops", "wall_seconds",
    "student_parameters", "student_flops", "teacher_images", "student_images", "generator_steps",
    "teacher_parameters", "teacher_flops",
)
COMPARED_TAGS = (VARIANT,)


# ----------------------------------------------------------------------------- the store
def default_tracking_uri(results: Path) -> str:
    """The embedded store: SQLite under ``results``."""
    return f"sqlite:///{(Path(results) / DB_NAME).resolve()}"


def resolve_tracking_uri(results: Path, uri: str | None = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(results)


def is_local(uri: str) -> bool:
    """A store in a local database (we choose its artifact folder), not a tracking server."""
    return uri.startswith(("sqlite:", "postgresql", "mysql", "mssql"))


def artifact_root(results: Path) -> Path:
    return (Path(results) / ARTIFACTS_DIR).resolve()


def open_client(uri: str) -> MlflowClient:
    """A client on ``uri`` (creating the SQLite database and its tables on first use)."""
    from mlflow import MlflowClient

    from .stores import sql_url

    # MLflow prints "View run ... at: <url>" on stdout when a run on a server ends: it would break --json output.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=sql_url(uri))


def column_key(kind: str, name: str) -> str:
    """A runs-table column as the MLflow UI names it (``metrics.`test_accuracy```)."""
    return f"{kind}.`{name}`"


def view_state(grouped: bool) -> dict[str, Any]:
    """A shared view of the experiment page: cell runs only, compared metrics and tags as columns.

    Filtering on ``dfkd.kind = 'cell'`` and sorting by run name lists the cells flat (MLflow folds
    child runs under their parent only in its default sort by start time); ``grouped`` groups them by the ``group`` tag (one row per
    method × dataset × pair × budget × variant, metrics averaged over the seeds).
    """
    columns = [column_key("metrics", m) for m in COMPARED_METRICS] + [column_key("tags", t) for t in COMPARED_TAGS]
    run_name = column_key("attributes", "Run Name")
    state: dict[str, Any] = {
        "searchFilter": f"tags.`{KIND}` = 'cell'",
        # the UI nests child runs under their parent only when sorted by start time: sort by name
        "orderByKey": "tags.`mlflow.runName`",
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
        # column ids of the UI's grid: the name wide enough to read, accuracy first
        "columnOrder": [run_name, *columns],
        "columnWidths": {run_name: 330, **{c: 120 for c in columns}},
        "groupBy": None,
    }
    if grouped:
        state["groupBy"] = {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": GROUP}]}
        state["groupsExpanded"] = {}
    return state


def experiment_tags() -> dict[str, str]:
    """The experiment kind and the two shared views (see the module docstring)."""
    return {
        EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
        VIEW_TAG_PREFIX + VIEW_CELLS: json.dumps(view_state(False), separators=(",", ":")),
        VIEW_TAG_PREFIX + VIEW_GROUPED: json.dumps(view_state(True), separators=(",", ":")),
    }


def tag_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Set the experiment-kind and view tags where missing or outdated (experiments made before them too)."""
    current = client.get_experiment(experiment_id).tags
    for key, value in experiment_tags().items():
        if current.get(key) != value:
            client.set_experiment_tag(experiment_id, key, value)


def runs_page_url(base: str, experiment_id: str, view: str | None = VIEW_CELLS) -> str:
    """The address of an experiment's runs page in the MLflow UI at ``base``, opened on ``view``."""
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{url}?viewStateShareKey={view}" if view else url


def ensure_experiment(client: MlflowClient, name: str, results: Path, uri: str) -> str:
    """The id of experiment ``name``, created once (artifacts under ``results/mlartifacts/<name>``), tagged for the UI."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        location = (artifact_root(results) / name).as_uri() if is_local(uri) else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=experiment_tags())
        except MlflowException:  # created concurrently by another invocation
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise DfkdError(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore --experiment-id "
            f"{found.experiment_id}) or rename the grid"
        )
    tag_experiment(client, found.experiment_id)
    return found.experiment_id


def find_experiment(client: MlflowClient, name: str) -> str | None:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None and found.lifecycle_stage == "active" else None


def code_version() -> str:
    """Package version, plus the git commit (``+dirty`` with uncommitted changes) when in a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("dfkd-bench")
    except PackageNotFoundError:
        text = "unknown"
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        text += f"+git.{commit}" + (".dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def teacher_id(manifest: dict[str, Any]) -> str:
    return f"{manifest['dataset']}/{manifest['arch']}@{manifest['sha256'][:12]}"


# ----------------------------------------------------------------------------- runs
def _batches(items: list[Any]) -> Iterable[list[Any]]:
    for start in range(0, len(items), BATCH):
        yield items[start:start + BATCH]


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_param_value(v) for v in value) or "()"
    return str(value)


def cell_params(cell: Cell, manifest: dict[str, Any], version: str) -> dict[str, str]:
    """A cell's MLflow params: ``hp.<name>`` for every resolved hyperparameter, its identity, budget and teacher."""
    s = cell.spec
    params: dict[str, Any] = {f"hp.{k}": v for k, v in cell.hparams.items()}
    params.update({
        **s.identity(),
        "budget.collected": s.budget.collected,
        "budget.source": cell.source,
        "budget.balanced": s.budget.balanced,
        "budget.iterations": cell.hparams["iterations"],
        "budget.batch_size": cell.hparams["batch_size"],
        "teacher_id": teacher_id(manifest),
        "teacher_sha256": manifest["sha256"],
        "teacher_test_accuracy": manifest["test_accuracy"],
        "code_version": version,
    })
    return {k: _param_value(v) for k, v in params.items()}


def variant(cell: Cell) -> str:
    """The grid entry's overrides (``objective=kd,lr=0.02``; ``base`` without): what tells two cells of one method apart."""
    text = ",".join(f"{k}={_param_value(v)}" for k, v in sorted(cell.spec.overrides))
    return text[:500] or "base"


def cell_tags(cell: Cell) -> dict[str, str]:
    """Identity tags of a cell run; ``group`` (everything but the seed) is what the UI groups seeds by."""
    s = cell.spec
    kind = variant(cell)
    group = f"{s.method} {s.dataset} {cell.pair} c{s.budget.collected}" + ("" if kind == "base" else f" [{kind}]")
    return {
        KIND: "cell",
        CELL_ID: cell.cell_id,
        "method": s.method,
        "dataset": s.dataset,
        "budget": str(s.budget.collected),
        "seed": str(s.seed),
        "pair": cell.pair,
        "profile": s.profile,
        VARIANT: kind,
        GROUP: group,
    }


def start_cell_run(client: MlflowClient, experiment_id: str, parent_run_id: str, cell: Cell,
                   manifest: dict[str, Any], version: str, extra_tags: dict[str, str] | None = None) -> str:
    """Create the RUNNING child run of ``cell`` with its params, tags and ``cell.yaml``."""
    from mlflow.entities import Param, RunTag

    tags = {PARENT: parent_run_id, **cell_tags(cell), **(extra_tags or {})}
    run = client.create_run(experiment_id, tags=tags, run_name=cell.label)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in cell_params(cell, manifest, version).items()]
    for chunk in _batches(params):
        client.log_batch(run_id, params=chunk)
    client.log_text(run_id, yaml.safe_dump({**cell.to_dict(), "teacher_id": teacher_id(manifest)}, sort_keys=False),
                    "cell.yaml")
    client.log_batch(run_id, tags=[RunTag("dfkd.teacher_id", teacher_id(manifest)),
                                   RunTag("dfkd.teacher.sha256", manifest["sha256"])])
    return run_id


def resumable_run(client: MlflowClient, experiment_id: str, cell_id: str) -> Run | None:
    """The cell's most recent run that did not finish (KILLED, FAILED, or a stale RUNNING one), if any."""
    runs = search(client, experiment_id, f"tags.`{CELL_ID}` = '{cell_id}' and tags.`{KIND}` = 'cell'")
    runs = sorted(runs, key=lambda r: r.info.start_time)
    if not runs or runs[-1].info.status == "FINISHED":
        return None
    return runs[-1]


def reopen_cell_run(client: MlflowClient, run: Run, extra_tags: dict[str, str]) -> str:
    """Continue ``run`` (its cell resumes from its checkpoint): RUNNING again, metric steps go on, no second run."""
    from mlflow.entities import RunTag

    run_id = run.info.run_id
    client.update_run(run_id, status="RUNNING")
    resumes = int(run.data.tags.get("dfkd.resumes", "0")) + 1
    tags = {**extra_tags, "dfkd.resumes": str(resumes), "dfkd.ended": f"resumed from its checkpoint ({resumes}x)"}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    for stale in ("dfkd.error", "dfkd.error_type"):  # from a failed attempt; this attempt reports its own
        if stale in run.data.tags:
            client.delete_tag(run_id, stale)
    return run_id


def image_array(value: Any) -> Any | None:
    """A uint8 CHW (or HW) tensor as an HWC / HW numpy array for PNG; ``None`` when not an image."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() not in (2, 3):
        return None
    array = value.detach().cpu()
    if array.dim() == 3:
        if array.shape[0] not in (1, 3, 4):
            return None
        array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    return array.contiguous().numpy()


def log_artifact_value(client: MlflowClient, run_id: str, name: str, value: Any) -> None:
    """A method artifact: uint8 image tensors as ``<name>.png``, text as ``.txt``, dicts as ``.yaml``, else ``.pt``."""
    image = image_array(value)
    if image is not None:
        from PIL import Image

        client.log_image(run_id, Image.fromarray(image), artifact_file=f"{name}.png")
    elif isinstance(value, str):
        client.log_text(run_id, value, f"{name}.txt")
    elif isinstance(value, dict):
        client.log_text(run_id, yaml.safe_dump(value, sort_keys=False, default_flow_style=False), f"{name}.yaml")
    else:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{name}.pt"
            torch.save(value, path)
            client.log_artifact(run_id, str(path))


class MlflowCallback(BaseCallback):
    """The methods' callback protocol into one MLflow run: metrics with step = iteration, artifacts."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def on_start(self, info: dict[str, Any]) -> None:
        self.client.set_tag(self.run_id, "device", str(info.get("device", "")))

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        for chunk in _batches(batch):
            self.client.log_batch(self.run_id, metrics=chunk)

    def on_artifact(self, name: str, value: Any) -> None:
        log_artifact_value(self.client, self.run_id, name, value)


def log_result(client: MlflowClient, run_id: str, result: DistillResult) -> None:
    """After a successful run: flags as tags, best iteration, and ``student.pt``."""
    from mlflow.entities import RunTag

    tags = [RunTag(f"flag.{name}", reason[:5000]) for name, reason in result.flags.items()]
    tags.append(RunTag("best_iteration", str(result.best_iteration)))
    client.log_batch(run_id, tags=tags)
    checkpoint = {
        "predictor": {k: v.detach().cpu() for k, v in result.predictor.state_dict().items()},
        "best_predictor": {k: v.detach().cpu() for k, v in result.best_predictor.state_dict().items()},
        "best_iteration": result.best_iteration,
        "hparams": result.hparams,
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "student.pt"
        torch.save(checkpoint, path)
        client.log_artifact(run_id, str(path))


def log_error(client: MlflowClient, run_id: str, error: BaseException) -> None:
    """``error.txt`` with the traceback, and the one-line message as tags."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    client.log_text(run_id, text, "error.txt")
    client.set_tag(run_id, "dfkd.error", (f"{type(error).__name__}: {error}")[:5000])
    client.set_tag(run_id, "dfkd.error_type", type(error).__name__)


def end_run(client: MlflowClient, run_id: str, status: str) -> None:
    client.set_terminated(run_id, status)


def start_grid_run(client: MlflowClient, experiment_id: str, plan: Plan, tags: dict[str, str],
                   params: dict[str, Any], heartbeat: float) -> str:
    """The parent run of one invocation (kept alive by a heartbeat tag), with ``grid.yaml`` and ``plan.yaml``."""
    from mlflow.entities import Param

    tags = {KIND: "grid", HEARTBEAT: str(time.time()), HEARTBEAT_INTERVAL: str(heartbeat), **tags}
    run = client.create_run(experiment_id, tags=tags,
                            run_name=f"{plan.grid.name} {time.strftime('%Y-%m-%d %H:%M:%S')}")
    run_id = run.info.run_id
    for chunk in _batches([Param(k, _param_value(v)) for k, v in params.items()]):
        client.log_batch(run_id, params=chunk)
    source = Path(plan.grid.source)
    if source.is_file():
        client.log_text(run_id, source.read_text(), "grid.yaml")
    client.log_text(run_id, yaml.safe_dump(
        {"cells": [c.to_dict() for c in plan.cells],
         "skipped": [{"cell": s.label, "reason": s.reason} for s in plan.skipped]}, sort_keys=False), "plan.yaml")
    return run_id


def search(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    """Every run of the experiment matching ``filter_string`` (all pages)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def cell_runs(client: MlflowClient, experiment_id: str, status: str | None = None) -> list[Run]:
    query = f"tags.`{KIND}` = 'cell'"
    if status:
        query += f" and attributes.status = '{status}'"
    return search(client, experiment_id, query)


def finished_cells(client: MlflowClient, experiment_id: str) -> dict[str, Run]:
    """cell id → its FINISHED run (the first one, should a race have produced two)."""
    done: dict[str, Run] = {}
    for run in sorted(cell_runs(client, experiment_id, "FINISHED"), key=lambda r: r.info.start_time):
        done.setdefault(run.data.tags.get(CELL_ID, ""), run)
    return done


def latest_by_cell(client: MlflowClient, experiment_id: str) -> dict[str, Run]:
    """cell id → its FINISHED run if any, else its most recent run."""
    latest: dict[str, Run] = {}
    for run in sorted(cell_runs(client, experiment_id), key=lambda r: r.info.start_time):
        cid = run.data.tags.get(CELL_ID, "")
        if cid in latest and latest[cid].info.status == "FINISHED":
            continue
        latest[cid] = run
    return latest


def kill_stale(client: MlflowClient, experiment_id: str, is_alive: Callable[[Run], bool],
               cell_id: str | None = None, kind: str | None = None) -> list[Run]:
    """Mark RUNNING runs whose process is gone (``is_alive`` false) KILLED; returns them."""
    query = "attributes.status = 'RUNNING'"
    if kind is not None:
        query += f" and tags.`{KIND}` = '{kind}'"
    if cell_id is not None:
        query += f" and tags.`{CELL_ID}` = '{cell_id}'"
    killed = []
    for run in search(client, experiment_id, query):
        if not is_alive(run):
            client.set_tag(run.info.run_id, "dfkd.ended", "stale: its process stopped without ending the run")
            client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run)
    return killed


def heartbeat_alive(run: Run) -> bool:
    """A grid (parent) run is alive while its invocation refreshes ``dfkd.heartbeat`` (3 intervals of grace)."""
    try:
        interval = float(run.data.tags.get(HEARTBEAT_INTERVAL, "10"))
        return time.time() - float(run.data.tags.get(HEARTBEAT, "0")) < 3 * interval
    except ValueError:
        return False


def kill_stale_grid_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    """Mark RUNNING parent runs whose invocation stopped beating KILLED."""
    return kill_stale(client, experiment_id, lambda run: run.data.tags.get(KIND) != "grid" or heartbeat_alive(run),
                      kind="grid")


def load_checkpoint(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """``student.pt`` of a finished cell run (state dicts of the last and best-val predictor)."""
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, "student.pt", folder)
        return torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu", weights_only=True)
