"""Result tables and figures from the MLflow store (pandas frames from ``mlflow.search_runs``).

* :func:`results_table`: methods × (dataset, budget) test accuracy, mean ± std over seeds, the
  number of runs per cell and a teacher row;
* :func:`plot_sensitivity`: accuracy against one hyperparameter (``hp.<name>``) or the collected
  budget, mean ± std over seeds (HiDFD Figure 2); a study's trials are drawn as points;
* :func:`plot_curves`: validation accuracy against iteration per method;
* :func:`plot_samples`: a run's ``samples.png``.

Figures are written as PNG and PDF under ``<results>/plots`` and logged to MLflow (a run tagged
``dfkd.kind=plot`` in the experiment they are drawn from).
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from methods.core.errors import DfkdError

from . import tracking
from .units import si

if TYPE_CHECKING:
    from mlflow import MlflowClient

RUN_KINDS = ("cell", "trial")
COLLECTED = "collected"
FIGURE2 = ("lambda_d", "lambda_g", "inflation", COLLECTED)
LABELS = {"lambda_d": "λ_d (feature-integration weight in D's loss)", "lambda_g": "λ_g (frequency-smoothing weight in G's loss)",
          "inflation": "inflation factor N (copies of each collected image)", COLLECTED: "collected examples (count)"}
METRIC_LABELS = {"test_accuracy": "test accuracy (%)", "best_val_test_accuracy": "test accuracy at best val (%)",
                 "best_val_accuracy": "best validation accuracy (%)", "val_accuracy": "validation accuracy (%)"}


# ----------------------------------------------------------------------------- loading
def load_runs(uri: str, experiment: str | None = None, kinds: Sequence[str] = RUN_KINDS,
              finished: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """Cell / trial runs (FINISHED only by default) of one experiment, or of every experiment.

    Returns the ``mlflow.search_runs`` frame and the experiment ids; a one-line error when the
    experiment does not exist or holds no such run.
    """
    import mlflow

    client = tracking.open_client(uri)
    if experiment:
        exp = tracking.find_experiment(client, experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise DfkdError(f"no MLflow experiment {experiment!r} in {uri}; found: {', '.join(names) or 'none'}")
        ids = [exp]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    frames = []
    before_env, before_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # search_runs reads the global URI: set it only for these calls
    try:
        for kind in kinds if ids else ():
            query = f"tags.`{tracking.KIND}` = '{kind}'" + (" and attributes.status = 'FINISHED'" if finished else "")
            found = mlflow.search_runs(experiment_ids=ids, filter_string=query, output_format="pandas")
            if len(found):
                frames.append(found)
    finally:
        mlflow.set_tracking_uri(before_uri)
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env
    frame = pd.concat(frames, ignore_index=True) if frames else None
    if frame is None or len(frame) == 0:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        raise DfkdError(f"no finished run in {where} of {uri}; run a grid (dfkd-bench run --grid) or a study first")
    return frame, ids


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ----------------------------------------------------------------------------- tables
# Size and cost next to accuracy (spec §2.1 "What is deployed"): the deployed predictor's
# parameters and forward FLOPs per image, and the FLOPs each run spent training.
SIZE_COLUMNS = {"student_parameters": "params", "student_flops": "flops", "train_flops": "train_flops"}
TEACHER_SIZE = {"teacher_parameters": "params", "teacher_flops": "flops"}


def _row_labels(data: pd.DataFrame) -> pd.Series:
    """The method name; with the deployed size appended where one method deployed several sizes
    (e.g. SimKD's shared-head predictor next to the bare student), so they never share a row."""
    if "metrics.student_parameters" not in data.columns:
        return data["tags.method"]
    params = data["metrics.student_parameters"]
    sizes = data.groupby("tags.method")["metrics.student_parameters"].nunique()
    return pd.Series([f"{m} [{p / 1000:.1f}k params]" if sizes[m] > 1 and p == p else m
                      for m, p in zip(data["tags.method"], params, strict=True)], index=data.index)


def summarize(frame: pd.DataFrame, metric: str = "test_accuracy") -> pd.DataFrame:
    """Long form: one row per (method, dataset, pair, budget) with mean, sample std (NaN for one run) and n (in %),
    and the mean deployed parameters / FLOPs per image and training FLOPs of those runs (spec §2.1)."""
    column = f"metrics.{metric}"
    if column not in frame.columns or frame[column].notna().sum() == 0:
        raise DfkdError(f"no run has metric {metric!r}; allowed: "
                        + ", ".join(sorted(c[8:] for c in frame.columns if c.startswith("metrics."))))
    data = frame[frame[column].notna()].copy()
    data["value"] = 100 * data[column].astype(float)
    data["budget"] = data["tags.budget"].astype(int)
    data["row"] = _row_labels(data)
    keys = ["row", "tags.dataset", "tags.pair", "budget"]
    grouped = data.groupby(keys)["value"].agg(["mean", "std", "count"])
    sizes = {name: f"metrics.{key}" for key, name in SIZE_COLUMNS.items() if f"metrics.{key}" in data.columns}
    if sizes:
        grouped = grouped.join(data.groupby(keys)[list(sizes.values())].mean().rename(
            columns={v: k for k, v in sizes.items()}))
    grouped = grouped.reset_index()
    teacher_col = "metrics.teacher_accuracy"
    if teacher_col in data.columns and data[teacher_col].notna().any():
        data["teacher"] = 100 * data[teacher_col].astype(float)
        teacher = data.groupby(keys[1:])["teacher"].agg(["mean", "std", "count"])
        tsizes = {name: f"metrics.{key}" for key, name in TEACHER_SIZE.items() if f"metrics.{key}" in data.columns}
        if tsizes:
            teacher = teacher.join(data.groupby(keys[1:])[list(tsizes.values())].mean().rename(
                columns={v: k for k, v in tsizes.items()}))
        teacher = teacher.reset_index()
        teacher.insert(0, "row", "teacher")
        grouped = pd.concat([teacher, grouped], ignore_index=True)
    grouped = grouped.rename(columns={"row": "method", "tags.dataset": "dataset", "tags.pair": "pair",
                                      "count": "n"})
    return grouped


def size_columns(long: pd.DataFrame) -> pd.DataFrame:
    """Per table row: deployed parameters, forward FLOPs per image, and training FLOPs per run
    (a range when the row's cells differ)."""
    out = {}
    for method, rows in long.groupby("method", sort=False):
        entry = {}
        for name, label in (("params", "params"), ("flops", "FLOPs/img"), ("train_flops", "train FLOPs/run")):
            if name not in rows.columns or rows[name].isna().all():
                continue
            low, high = rows[name].min(), rows[name].max()
            entry[label] = si(low) if math.isclose(low, high, rel_tol=0.01) else f"{si(low)}–{si(high)}"
        out[method] = entry
    return pd.DataFrame.from_dict(out, orient="index")


def wide(long: pd.DataFrame) -> pd.DataFrame:
    """Methods × (dataset, budget) cells ``mean ± std (n)``; the pair joins the column when a dataset has several."""
    pairs = long.groupby("dataset")["pair"].nunique()
    long = long.copy()
    long["column"] = [f"{d} {p} c={b}" if pairs[d] > 1 else f"{d} c={b}"
                      for d, p, b in zip(long["dataset"], long["pair"], long["budget"], strict=True)]
    # one run has no spread: show its value alone rather than a made-up "± 0.00"
    long["cell"] = [f"{m:.2f} ± {s:.2f} ({n})" if n > 1 else f"{m:.2f} ({n})"
                    for m, s, n in zip(long["mean"], long["std"], long["n"], strict=True)]
    order = list(dict.fromkeys(long.sort_values(["dataset", "pair", "budget"])["column"]))
    methods = list(dict.fromkeys(["teacher", *sorted(set(long["method"]) - {"teacher"})]))
    table = long.pivot_table(index="method", columns="column", values="cell", aggfunc="first")
    table = table.reindex(index=[m for m in methods if m in table.index], columns=order).fillna("–")
    sizes = size_columns(long)
    if len(sizes.columns):
        table = table.join(sizes.reindex(table.index).fillna("–"))
    table.index.name = "method"
    table.columns.name = None
    return table


def render(long: pd.DataFrame, fmt: str, metric: str) -> str:
    if fmt == "csv":
        return long.to_csv(index=False, float_format="%.4f")
    table = wide(long)
    header = ["method", *table.columns]
    rows = [[index, *row] for index, row in zip(table.index, table.values.tolist(), strict=True)]
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
        note = (f"\n{METRIC_LABELS.get(metric, metric)}: mean ± std over seeds (number of runs). params and "
                "FLOPs/img: the deployed predictor (multiply-add = 2 FLOPs); train FLOPs/run: every network's "
                "forward and backward passes during training\n")
        return "\n".join(lines) + "\n" + note
    if fmt == "latex":
        def esc(text: Any) -> str:
            return re.sub(r"([_%&#$])", r"\\\1", str(text)).replace("±", r"$\pm$").replace("->", r"$\to$")

        lines = [r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule",
                 " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(esc(c) for c in r) + r" \\" for r in rows]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise DfkdError(f"bad format {fmt!r}; allowed: md, csv, latex")


def results_table(uri: str, experiment: str | None, fmt: str = "md",
                  metric: str = "test_accuracy") -> tuple[str, pd.DataFrame]:
    frame, _ = load_runs(uri, experiment, kinds=("cell",))
    long = summarize(frame, metric)
    return render(long, fmt, metric), long


# ----------------------------------------------------------------------------- figures
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def x_column(param: str) -> str:
    return "params.budget.collected" if param == COLLECTED else f"params.hp.{param}"


def sweep_params(frame: pd.DataFrame) -> list[str]:
    """Hyperparameters (and the collected budget) that take more than one value across the runs."""
    out = [c[len("params.hp."):] for c in frame.columns if c.startswith("params.hp.")
           and frame[c].nunique(dropna=True) > 1]
    if "params.budget.collected" in frame.columns and frame["params.budget.collected"].nunique() > 1:
        out.append(COLLECTED)
    return out


def _check_param(frame: pd.DataFrame, param: str) -> None:
    if x_column(param) not in frame.columns:
        allowed = sorted(c[len("params.hp."):] for c in frame.columns if c.startswith("params.hp."))
        raise DfkdError(f"unknown parameter {param!r}: no run records it; allowed: {', '.join([COLLECTED, *allowed])}")


def base_slice(frame: pd.DataFrame, param: str) -> pd.DataFrame:
    """The runs of a one-at-a-time sweep along ``param``: every other swept value at its most common setting."""
    keep = pd.Series(True, index=frame.index)
    for other in sweep_params(frame):
        if other == param:
            continue
        column = frame[x_column(other)]
        keep &= column == column.mode().iloc[0]
    return frame[keep]


def pick_metric(frame: pd.DataFrame, metric: str) -> str:
    if metric != "auto":
        if f"metrics.{metric}" not in frame.columns:
            raise DfkdError(f"no run has metric {metric!r}")
        return metric
    test = frame.get("metrics.test_accuracy")
    return "test_accuracy" if test is not None and test.notna().any() else "best_val_accuracy"


def _title_parts(data: pd.DataFrame, param: str) -> str:
    datasets = ", ".join(sorted(set(data["tags.dataset"])))
    pairs = ", ".join(sorted(set(data["tags.pair"])))
    budgets = "collected: swept" if param == COLLECTED else \
        "collected " + ", ".join(sorted(set(data["tags.budget"]), key=int))
    return f"{datasets}, {pairs}, {budgets}"


def sensitivity_axes(ax: Any, frame: pd.DataFrame, param: str, metric: str) -> pd.DataFrame:
    """Draw one panel; returns the plotted points (method, x, mean, std, n)."""
    _check_param(frame, param)
    trials = frame[frame["tags.dfkd.kind"] == "trial"]
    cells = base_slice(frame[frame["tags.dfkd.kind"] == "cell"], param)
    column = f"metrics.{metric}"
    points = []
    for method, group in cells.groupby("tags.method"):
        group = group[group[column].notna()]
        xs = group[x_column(param)].map(_number)
        numeric = xs.notna().all()
        keys = xs if numeric else group[x_column(param)]
        stats = (100 * group[column]).groupby(keys.values).agg(["mean", "std", "count"]).sort_index()
        stats["std"] = stats["std"].fillna(0.0)
        positions = list(stats.index) if numeric else list(range(len(stats)))
        ax.errorbar(positions, stats["mean"], yerr=stats["std"], marker="o", capsize=3,
                    label=f"{method} (mean ± std over seeds)")
        if not numeric:
            ax.set_xticks(positions, [str(v) for v in stats.index])
        for x, row in stats.iterrows():
            points.append({"method": method, "x": x, "mean": row["mean"], "std": row["std"], "n": int(row["count"])})
    for method, group in trials.groupby("tags.method"):
        group = group[group[column].notna()]
        if len(group):
            xs = group[x_column(param)].map(_number)
            ax.scatter(xs, 100 * group[column], alpha=0.6, marker="x", label=f"{method} trials")
            points += [{"method": f"{method} trial", "x": x, "mean": 100 * y, "std": 0.0, "n": 1}
                       for x, y in zip(xs, group[column], strict=True)]
    if not points:
        raise DfkdError(f"no finished run with metric {metric!r} varies {param!r}")
    xs = [p["x"] for p in points if isinstance(p["x"], (int, float))]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 20:
        ax.set_xscale("log")
    unit = "" if param in LABELS else " (value)"
    ax.set_xlabel(LABELS.get(param, param) + unit)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return pd.DataFrame(points)


def save_figure(fig: Any, results: Path, stem: str, uri: str, experiment_ids: Sequence[str]) -> list[Path]:
    """PNG and PDF under ``<results>/plots``, logged to a ``dfkd.kind=plot`` run of the (first) experiment."""
    folder = Path(results) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.png", folder / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    _pyplot().close(fig)
    if experiment_ids:
        client = tracking.open_client(uri)
        run = client.create_run(experiment_ids[0], run_name=f"plot {stem}", tags={tracking.KIND: "plot"})
        for path in paths:
            client.log_artifact(run.info.run_id, str(path), "plots")
        client.set_terminated(run.info.run_id, "FINISHED")
    return paths


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "all"


def plot_sensitivity(uri: str, results: Path, experiment: str | None, param: str,
                     metric: str = "auto") -> tuple[list[Path], pd.DataFrame]:
    """One panel (``param``), or ``all`` / ``figure2``: a 2×2 (or wider) figure of every swept parameter."""
    frame, ids = load_runs(uri, experiment)
    metric = pick_metric(frame, metric)
    plt = _pyplot()
    if param in ("all", "figure2"):
        swept = sweep_params(frame)
        params = [p for p in FIGURE2 if p in swept] + ([p for p in swept if p not in FIGURE2] if param == "all" else [])
        if not params:
            raise DfkdError(f"no hyperparameter varies across the runs of {experiment or 'the store'}; "
                            "run a sweep grid (e.g. --grid hidfd-sensitivity) first")
        cols = 2 if len(params) > 1 else 1
        rows = math.ceil(len(params) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
        tables = []
        for i, (ax, name) in enumerate(zip(axes.flat, params, strict=False)):
            table = sensitivity_axes(ax, frame, name, metric)
            ax.set_title(f"({chr(97 + i)}) {LABELS.get(name, name).split(' (')[0]}")
            tables.append(table.assign(param=name))
        for ax in list(axes.flat)[len(params):]:
            ax.set_visible(False)
        fig.suptitle(f"Sensitivity: {_title_parts(frame, COLLECTED if COLLECTED in params else '')}")
        fig.tight_layout()
        points = pd.concat(tables, ignore_index=True)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        points = sensitivity_axes(ax, frame, param, metric).assign(param=param)
        ax.set_title(f"Sensitivity to {param}: {_title_parts(frame, param)}")
        fig.tight_layout()
    stem = f"sensitivity-{_safe(experiment or 'all')}-{_safe(param)}"
    return save_figure(fig, results, stem, uri, ids), points


def plot_curves(uri: str, results: Path, experiment: str | None, metric: str = "val_accuracy") -> list[Path]:
    """Validation accuracy against iteration, one line per method (mean ± std band over seeds), per (dataset, pair, budget)."""
    frame, ids = load_runs(uri, experiment, kinds=("cell",))
    client = tracking.open_client(uri)
    plt = _pyplot()
    paths: list[Path] = []
    for (dataset, pair, budget), group in frame.groupby(["tags.dataset", "tags.pair", "tags.budget"]):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for method, runs in group.groupby("tags.method"):
            series = []
            for run_id in runs["run_id"]:
                history = client.get_metric_history(run_id, metric)
                series.append(pd.Series({m.step: 100 * m.value for m in history}))
            table = pd.concat(series, axis=1).sort_index()
            mean, std = table.mean(axis=1), table.std(axis=1).fillna(0.0)
            ax.plot(mean.index, mean.values, marker=".", label=f"{method} ({table.shape[1]} run(s))")
            ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("iteration (outer-loop steps)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(f"{METRIC_LABELS.get(metric, metric).split(' (')[0]}: {dataset}, {pair}, collected {budget}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        paths += save_figure(fig, results, f"curves-{_safe(experiment or 'all')}-{_safe(dataset)}-"
                                           f"{_safe(pair)}-c{budget}", uri, ids)
    return paths


def plot_samples(uri: str, results: Path, run_id: str | None, experiment: str | None,
                 method: str | None) -> list[Path]:
    """A run's ``samples.png`` (per-class grid of generated images) as a titled figure."""
    client = tracking.open_client(uri)
    if run_id is None:
        frame, _ = load_runs(uri, experiment, kinds=("cell",))
        if method:
            frame = frame[frame["tags.method"] == method]
        chosen = None
        for rid in frame.sort_values("start_time", ascending=False)["run_id"]:
            if any(f.path == "samples.png" for f in client.list_artifacts(rid)):
                chosen = rid
                break
        if chosen is None:
            raise DfkdError(f"no finished run{f' of method {method!r}' if method else ''} has samples.png")
        run_id = chosen
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001  (MLflow raises its own exception types)
        raise DfkdError(f"no MLflow run {run_id!r} in {uri}") from None
    if not any(f.path == "samples.png" for f in client.list_artifacts(run_id)):
        raise DfkdError(f"run {run_id} has no samples.png (its method adds no samples)")
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        image = Image.open(client.download_artifacts(run_id, "samples.png", folder)).copy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(image, cmap="gray" if image.mode == "L" else None)
    ax.axis("off")
    tags = run.data.tags
    ax.set_title(f"{tags.get('method', '?')} samples: {tags.get('dataset', '?')}, {tags.get('pair', '?')}, "
                 f"collected {tags.get('budget', '?')}, seed {tags.get('seed', '?')}")
    fig.tight_layout()
    return save_figure(fig, results, f"samples-{_safe(tags.get('method', 'run'))}-{run_id[:8]}", uri,
                       [run.info.experiment_id])


def open_uri(results: Path, uri: str | None) -> str:
    """The tracking URI to read results from; a one-line error when its SQLite file does not exist.

    Tables and figures only read the store: opening a missing SQLite file would create an empty
    ``mlflow.db`` (a refused command writes nothing).
    """
    resolved = tracking.resolve_tracking_uri(results, uri)
    if resolved.startswith("sqlite:///") and not Path(resolved[len("sqlite:///"):]).is_file():
        raise DfkdError(f"no MLflow store at {resolved[len('sqlite:///'):]}; run a grid (dfkd-bench run --grid) or "
                        "a study (dfkd-bench tune) first, or give --tracking-uri / --results")
    return resolved


def client_for(uri: str) -> MlflowClient:
    return tracking.open_client(uri)
