"""Result tables and figures from the MLflow store (pandas frames from ``mlflow.search_runs``).

* :func:`results_table`: methods × (dataset, budget) test accuracy, mean ± std over seeds, the
  number of runs per cell and a teacher row; ``layout="paper"``: a row per method and objective,
  the teacher once per dataset;
* :func:`plot_sensitivity`: accuracy against one hyperparameter (``hp.<name>``) or the collected
  budget, mean ± std over seeds (HiDFD Figure 2); a study's trials are drawn as points;
  KD-collected at the panel's budget and the teacher are reference lines;
* :func:`plot_budget`: accuracy against the collected budget per method (HiDFD's claim), the
  data-free methods and the teacher as reference lines;
* :func:`plot_compute`: accuracy against each run's training FLOPs (or wall seconds);
* :func:`plot_curves`: validation accuracy against iteration per method;
* :func:`plot_samples`: a run's ``samples.png``.

Figures are written as PNG and PDF under ``<results>/plots`` and logged to MLflow under
``plots/`` of the experiment's latest grid (parent) run, or of a ``dfkd.kind=plot`` run when the
experiment has none (a study).
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
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
                 "best_val_accuracy": "best validation accuracy (%)", "val_accuracy": "validation accuracy (%)",
                 "probe/class_coverage": "teacher class coverage of its last training batch (%)",
                 "probe/agreement": "student-teacher agreement on the teacher's last training batch (%)",
                 "probe/teacher_confidence": "teacher confidence on its last training batch (%)",
                 "probe/teacher_logit_abs": "teacher mean |logit| on its last training batch",
                 "probe/silent_units": "student units silent on 512 held-out real images (%)"}
# Logged at every evaluation (spec §1.5; probe/*: methods/core/probe.py), besides each method's loss/<term>.
EVALUATION_METRICS = ("val_accuracy", "best_val_accuracy", "probe/class_coverage", "probe/agreement",
                      "probe/teacher_confidence", "probe/teacher_logit_abs", "probe/silent_units")
# Metrics tracked as fractions and plotted in percent.
FRACTION_METRICS = {"test_accuracy", "best_val_test_accuracy", "best_val_accuracy", "val_accuracy",
                    "probe/class_coverage", "probe/agreement", "probe/teacher_confidence", "probe/silent_units"}


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


def run_labels(frame: pd.DataFrame) -> pd.Series:
    """What names a line / a table row: the method, with its ``objective`` when the run records one.

    ``kd-collected (simkd)`` and ``kd-collected (kd)`` are two lines of one method (spec §4.2);
    any method that gains an ``objective`` hyperparameter is split the same way.
    """
    labels = frame["tags.method"].astype(str)
    if "params.hp.objective" in frame.columns:
        objective = frame["params.hp.objective"]
        has = objective.notna() & (objective.astype(str) != "None")
        labels = labels.where(~has, labels + " (" + objective.astype(str) + ")")
    return labels


def summarize(frame: pd.DataFrame, metric: str = "test_accuracy", variants: bool = False) -> pd.DataFrame:
    """Long form: one row per (method, dataset, pair, budget) with mean, sample std (NaN for one run) and n (in %),
    and the mean deployed parameters / FLOPs per image and training FLOPs of those runs (spec §2.1).

    ``variants``: a method's objectives are rows of their own (:func:`run_labels`).
    """
    column = f"metrics.{metric}"
    if column not in frame.columns or frame[column].notna().sum() == 0:
        raise DfkdError(f"no run has metric {metric!r}; allowed: "
                        + ", ".join(sorted(c[8:] for c in frame.columns if c.startswith("metrics."))))
    data = frame[frame[column].notna()].copy()
    data["value"] = 100 * data[column].astype(float)
    data["budget"] = data["tags.budget"].astype(int)
    if variants:
        data["tags.method"] = run_labels(data)
    data["row"] = data["tags.method"]
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


def _latex(text: Any) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", str(text)).replace("±", r"$\pm$").replace("->", r"$\to$")


def paper_layout(long: pd.DataFrame) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[str]]], str]:
    """Methods as rows, (dataset[, pair]) × budget as columns, the teacher once per dataset.

    Returns the column groups (``mnist`` → its budgets), the rows (label, cells) with the
    teacher first, and the seeds note: ``mean ± std over N seeds`` when every cell has N runs,
    else every cell carries its run count in parentheses.
    """
    pairs = long.groupby("dataset")["pair"].nunique()
    long = long.copy()
    long["group"] = [f"{d} {p}" if pairs[d] > 1 else d for d, p in zip(long["dataset"], long["pair"], strict=True)]
    students = long[long["method"] != "teacher"]
    groups = [(g, sorted(set(students.loc[students["group"] == g, "budget"])))
              for g in dict.fromkeys(long.sort_values(["dataset", "pair"])["group"])]
    groups = [(g, b) for g, b in groups if b]
    counts = set(students["n"])
    uniform = len(counts) == 1

    def cell(row: pd.Series) -> str:
        text = f"{row['mean']:.2f} ± {row['std']:.2f}" if row["n"] > 1 else f"{row['mean']:.2f}"
        return text if uniform else f"{text} ({row['n']})"

    rows: list[tuple[str, list[str]]] = []
    teacher = long[long["method"] == "teacher"].groupby("group")["mean"].mean()
    if len(teacher):
        cells = []
        for g, budgets in groups:
            cells += [f"{teacher[g]:.2f}" if g in teacher.index else "–"] + [""] * (len(budgets) - 1)
        rows.append(("teacher", cells))
    index = {(r["method"], r["group"], r["budget"]): r for _, r in students.iterrows()}
    for method in sorted(set(students["method"])):
        rows.append((method, [cell(index[(method, g, b)]) if (method, g, b) in index else "–"
                              for g, budgets in groups for b in budgets]))
    n = next(iter(counts)) if uniform else None
    note = ("one seed (no spread)" if n == 1 else f"mean ± std over {n} seeds") if uniform else \
        "mean ± std (runs per cell)"
    return groups, rows, note


def render_paper(long: pd.DataFrame, fmt: str, metric: str) -> str:
    """The paper layout (:func:`paper_layout`) as md, csv or latex."""
    groups, rows, note = paper_layout(long)
    what = f"{METRIC_LABELS.get(metric, metric)}: {note}; the teacher's accuracy is given once per dataset"
    columns = [f"{g} c={b}" for g, budgets in groups for b in budgets]
    if fmt == "csv":
        frame = pd.DataFrame([[label, *cells] for label, cells in rows], columns=["method", *columns])
        return frame.to_csv(index=False)
    if fmt == "md":
        lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "|".join([":---:"] * len(columns)) + "|"]
        lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]
        return "\n".join(lines) + f"\n\n{what}\n"
    if fmt == "latex":
        width = sum(len(b) for _, b in groups)
        lines = [r"\begin{tabular}{l" + "c" * width + "}", r"\toprule",
                 " & " + " & ".join(rf"\multicolumn{{{len(b)}}}{{c}}{{{_latex(g)}}}" for g, b in groups) + r" \\",
                 "collected & " + " & ".join(str(b) for _, budgets in groups for b in budgets) + r" \\", r"\midrule"]
        for label, cells in rows:
            if label == "teacher":  # one value spanning each dataset's budgets
                spans, at = [], 0
                for _, budgets in groups:
                    spans.append(rf"\multicolumn{{{len(budgets)}}}{{c}}{{{_latex(cells[at])}}}")
                    at += len(budgets)
                lines.append("teacher & " + " & ".join(spans) + r" \\ \midrule")
            else:
                lines.append(" & ".join(_latex(c) for c in [label, *cells]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", f"% {what}"]
        return "\n".join(lines) + "\n"
    raise DfkdError(f"bad format {fmt!r}; allowed: md, csv, latex")


LAYOUTS = ("long", "paper")


def results_table(uri: str, experiment: str | None, fmt: str = "md",
                  metric: str = "test_accuracy", layout: str = "long") -> tuple[str, pd.DataFrame]:
    """``long``: the methods × columns table with run counts (csv: one row per cell); ``paper``: :func:`render_paper`."""
    if layout not in LAYOUTS:
        raise DfkdError(f"bad layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    frame, _ = load_runs(uri, experiment, kinds=("cell",))
    long = summarize(frame, metric, variants=layout == "paper")
    text = render_paper(long, fmt, metric) if layout == "paper" else render(long, fmt, metric)
    return text, long


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
    seeds = [p["n"] for p in points if not str(p["method"]).endswith(" trial")]
    ax.set_ylabel(METRIC_LABELS.get(metric, metric) + (f", {_over(seeds)}" if seeds else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return pd.DataFrame(points)


def drawn(fig: Any) -> dict[str, dict[str, list[float]]]:
    """What the figure's axes show, read back from the matplotlib artists: label → x, y (and y error).

    Lines (``errorbar`` / ``plot`` / ``axhline``) give their data; scatter collections their
    offsets.  Tests compare this to the tracked metrics, so a plotting slip cannot hide.
    """
    out: dict[str, dict[str, list[float]]] = {}
    axes = [ax for ax in fig.axes if ax.get_visible()]
    for i, ax in enumerate(axes):
        prefix = f"[{i}] " if len(axes) > 1 else ""
        inside: set[int] = set()
        for container in ax.containers:  # errorbar: the container holds the label, its first line the data
            label = str(container.get_label())
            data_line = getattr(container, "lines", (None,))[0]
            if data_line is None or label.startswith("_"):
                continue
            inside.add(id(data_line))
            out[prefix + label] = {"x": [float(v) for v in data_line.get_xdata()],
                                   "y": [float(v) for v in data_line.get_ydata()]}
        for line in ax.get_lines():
            label = str(line.get_label())
            if label.startswith("_") or id(line) in inside:
                continue
            out[prefix + label] = {"x": [float(v) for v in line.get_xdata()], "y": [float(v) for v in line.get_ydata()]}
        for collection in ax.collections:
            label = str(collection.get_label())
            offsets = collection.get_offsets()
            if label.startswith("_") or len(offsets) == 0:
                continue
            out[prefix + label] = {"x": [float(v) for v in offsets[:, 0]], "y": [float(v) for v in offsets[:, 1]]}
    return out


def grid_run(client: MlflowClient, experiment_id: str) -> str | None:
    """The experiment's latest parent (``dfkd.kind=grid``) run, if any."""
    runs = tracking.search(client, experiment_id, f"tags.`{tracking.KIND}` = 'grid'")
    return max(runs, key=lambda r: r.info.start_time).info.run_id if runs else None


def save_figure(fig: Any, results: Path, stem: str, uri: str, experiment_ids: Sequence[str]) -> list[Path]:
    """PNG and PDF under ``<results>/plots``, logged under ``plots/`` of the grid's parent run.

    The parent run is the (first) experiment's latest ``dfkd.kind=grid`` run; an experiment
    without one (a study) gets a ``dfkd.kind=plot`` run instead.
    """
    folder = Path(results) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.png", folder / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    _pyplot().close(fig)
    if experiment_ids:
        client = tracking.open_client(uri)
        parent = grid_run(client, experiment_ids[0])
        if parent is not None:
            for path in paths:
                client.log_artifact(parent, str(path), "plots")
        else:
            run = client.create_run(experiment_ids[0], run_name=f"plot {stem}", tags={tracking.KIND: "plot"})
            for path in paths:
                client.log_artifact(run.info.run_id, str(path), "plots")
            client.set_terminated(run.info.run_id, "FINISHED")
    return paths


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "all"


def _seeds(counts: Sequence[int] | pd.Series) -> str:
    """``3 seeds`` (every point over 3) or ``1-3 seeds``."""
    values = sorted({int(n) for n in counts})
    if not values:
        return "0 seeds"
    if len(values) == 1:
        return f"{values[0]} seed{'s' if values[0] != 1 else ''}"
    return f"{values[0]}–{values[-1]} seeds"


def _over(counts: Sequence[int] | pd.Series) -> str:
    """``mean ± std over 3 seeds``, or ``one seed (no spread)`` when no point has more than one run."""
    values = [int(n) for n in counts]
    return "one seed (no spread)" if values and max(values) == 1 else f"mean ± std over {_seeds(values)}"


def _teacher_line(ax: Any, runs: pd.DataFrame) -> dict[str, Any] | None:
    """The teacher's test accuracy (mean over the runs' teachers) as a dotted black line."""
    column = "metrics.teacher_accuracy"
    if column not in runs.columns or runs[column].notna().sum() == 0:
        return None
    value = 100 * float(runs[column].astype(float).mean())
    ax.axhline(value, color="black", linestyle=":", linewidth=1.2, label=f"teacher ({value:.2f}%)")
    return {"method": "teacher", "kind": "teacher", "x": None, "mean": value, "std": 0.0,
            "n": int(runs[column].notna().sum())}


def _reference_band(ax: Any, label: str, values: pd.Series, color: Any = None) -> dict[str, Any]:
    """A horizontal mean line with a ± std band (one run: no band)."""
    mean, std, n = float(values.mean()), float(values.std()) if len(values) > 1 else 0.0, len(values)
    line = ax.axhline(mean, linestyle="--", linewidth=1.2, color=color, label=f"{label} ({_seeds([n])})")
    if std > 0:
        ax.axhspan(mean - std, mean + std, color=line.get_color(), alpha=0.12)
    return {"method": label, "x": None, "mean": mean, "std": std, "n": n}


def sensitivity_references(ax: Any, cells: pd.DataFrame, references: pd.DataFrame, param: str,
                           metric: str) -> list[dict[str, Any]]:
    """The baseline at the panel's collected budget (a line over the budgets on the collected panel), and the teacher."""
    column = f"metrics.{metric}"
    points: list[dict[str, Any]] = []
    shown = base_slice(cells, param)
    if len(references) and column in references.columns:
        refs = references[references[column].notna()].copy()
        refs["label"] = run_labels(refs)
        refs["budget"] = refs["params.budget.collected"].astype(int)
        if param == COLLECTED:
            for label, group in refs.groupby("label"):
                stats = (100 * group[column]).groupby(group["budget"].values).agg(["mean", "std", "count"]).sort_index()
                stats["std"] = stats["std"].fillna(0.0)
                ax.errorbar(list(stats.index), stats["mean"], yerr=stats["std"], linestyle="--", marker="s", capsize=3,
                            label=f"{label}, reference (mean ± std over {_seeds(stats['count'])})")
                points += [{"method": f"reference {label}", "kind": "reference", "x": x, "mean": r["mean"],
                            "std": r["std"], "n": int(r["count"])} for x, r in stats.iterrows()]
        elif len(shown):
            budget = int(shown["params.budget.collected"].astype(int).mode().iloc[0])
            for label, group in refs[refs["budget"] == budget].groupby("label"):
                point = _reference_band(ax, f"{label} at {budget} collected", 100 * group[column])
                points.append({**point, "method": f"reference {point['method']}", "kind": "reference"})
    teacher = _teacher_line(ax, shown if len(shown) else cells)
    if teacher is not None:
        points.append(teacher)
    ax.legend(fontsize="small")
    return points


def plot_sensitivity(uri: str, results: Path, experiment: str | None, param: str,
                     metric: str = "auto", reference_method: str | None = "kd-collected",
                     reference_experiment: str | None = None) -> tuple[list[Path], pd.DataFrame]:
    """One panel (``param``), or ``all`` / ``figure2``: a 2×2 (or wider) figure of every swept parameter.

    The points' ``kind`` is ``swept`` (the sensitivity lines), ``reference`` or ``teacher``.  Runs of ``reference_method`` (KD on the collected examples by default), from the experiment
    itself or from ``reference_experiment``, are drawn as reference lines at the panel's budget,
    with the teacher, rather than as a swept method: does a setting matter next to the baseline?
    """
    frame, ids = load_runs(uri, experiment)
    metric = pick_metric(frame, metric)
    references = frame.iloc[0:0]
    if reference_method:
        source = load_runs(uri, reference_experiment, kinds=("cell",))[0] if reference_experiment else frame
        is_ref = (source["tags.method"] == reference_method) & (source["tags.dfkd.kind"] == "cell")
        references = source[is_ref]
        if not reference_experiment:
            frame = frame[~is_ref]
        if len(frame) == 0:
            raise DfkdError(f"experiment {experiment!r} holds only {reference_method!r} runs; nothing is swept")
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
        cells = frame[frame["tags.dfkd.kind"] == "cell"]
        for i, (ax, name) in enumerate(zip(axes.flat, params, strict=False)):
            table = sensitivity_axes(ax, frame, name, metric)
            extra = pd.DataFrame(sensitivity_references(ax, cells, references, name, metric))
            ax.set_title(f"({chr(97 + i)}) {LABELS.get(name, name).split(' (')[0]}")
            tables.append(pd.concat([table.assign(kind="swept"), extra], ignore_index=True).assign(param=name))
        for ax in list(axes.flat)[len(params):]:
            ax.set_visible(False)
        fig.suptitle(f"Sensitivity: {_title_parts(frame, COLLECTED if COLLECTED in params else '')}")
        fig.tight_layout()
        points = pd.concat(tables, ignore_index=True)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        points = sensitivity_axes(ax, frame, param, metric)
        extra = pd.DataFrame(sensitivity_references(ax, frame[frame["tags.dfkd.kind"] == "cell"], references, param,
                                                    metric))
        points = pd.concat([points.assign(kind="swept"), extra], ignore_index=True).assign(param=param)
        ax.set_title(f"Sensitivity to {param}: {_title_parts(frame, param)}")
        fig.tight_layout()
    stem = f"sensitivity-{_safe(experiment or 'all')}-{_safe(param)}"
    return save_figure(fig, results, stem, uri, ids), points


@dataclass
class Plotted:
    """A written figure: its files, the values it plots (computed), and what its artists show (:func:`drawn`)."""

    paths: list[Path]
    points: pd.DataFrame
    drawn: dict[str, dict[str, list[float]]]
    axes: list[dict[str, str]]


def axes_text(fig: Any) -> list[dict[str, str]]:
    """Each visible axes' labels, title and x scale (what a reader is told is plotted)."""
    return [{"xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "title": ax.get_title(), "xscale": ax.get_xscale()}
            for ax in fig.axes if ax.get_visible()]


def _metric_rows(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    column = f"metrics.{metric}"
    if column not in frame.columns or frame[column].notna().sum() == 0:
        raise DfkdError(f"no run has metric {metric!r}; allowed: "
                        + ", ".join(sorted(c[8:] for c in frame.columns if c.startswith("metrics."))))
    data = frame[frame[column].notna()].copy()
    data["label"] = run_labels(data)
    data["budget"] = data["tags.budget"].astype(int)
    data["value"] = 100 * data[column].astype(float)
    return data


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per line label, stable across panels and figures: matplotlib's 10-colour cycle, or
    tab20 when there are more labels (11 registered methods would otherwise share a colour)."""
    names = sorted(set(labels))
    if len(names) <= 10:
        return {label: f"C{i}" for i, label in enumerate(names)}
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {label: cmap(i % 20) for i, label in enumerate(names)}


def plot_budget(uri: str, results: Path, experiment: str | None, metric: str = "test_accuracy") -> Plotted:
    """Accuracy against the collected budget (HiDFD's claim), one panel per dataset and pair.

    Every method run with collected examples is a line (mean ± std over seeds per budget; a
    method's objectives are lines of their own), the data-free methods (budget 0) are dashed
    horizontal references with a ± std band, and the teacher a dotted line.
    """
    frame, ids = load_runs(uri, experiment, kinds=("cell",))
    data = _metric_rows(frame, metric)
    if not (data["budget"] > 0).any():
        raise DfkdError(f"no finished run of {experiment or 'the store'} took collected examples; "
                        "run a budget grid first (dfkd-bench run --grid hidfd-budget-cpu)")
    colors = _colors(data["label"])
    panels = sorted(data.groupby(["tags.dataset", "tags.pair"]).groups)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(7.2 * len(panels), 5.0), squeeze=False)
    points: list[dict[str, Any]] = []
    for ax, (dataset, pair) in zip(axes.flat, panels, strict=True):
        panel = data[(data["tags.dataset"] == dataset) & (data["tags.pair"] == pair)]
        lines = panel[panel["budget"] > 0]
        counts: list[int] = []
        for label, group in lines.groupby("label"):
            stats = group.groupby("budget")["value"].agg(["mean", "std", "count"]).sort_index()
            stats["std"] = stats["std"].fillna(0.0)
            ax.errorbar(list(stats.index), stats["mean"], yerr=stats["std"], marker="o", capsize=3,
                        color=colors[label], label=label)
            counts += list(stats["count"])
            points += [{"dataset": dataset, "pair": pair, "line": label, "kind": "collected", "budget": int(b),
                        "mean": r["mean"], "std": r["std"], "n": int(r["count"])} for b, r in stats.iterrows()]
        for label, group in panel[panel["budget"] == 0].groupby("label"):
            point = _reference_band(ax, f"{label} (data-free)", group["value"], colors[label])
            points.append({"dataset": dataset, "pair": pair, "line": point["method"], "kind": "data-free",
                           "budget": 0, "mean": point["mean"], "std": point["std"], "n": point["n"]})
        teacher = _teacher_line(ax, panel)
        if teacher is not None:
            points.append({"dataset": dataset, "pair": pair, "line": "teacher", "kind": "teacher", "budget": None,
                           "mean": teacher["mean"], "std": 0.0, "n": teacher["n"]})
        budgets = sorted(set(lines["budget"]))
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("collected examples (count, log scale; labels never used)")
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)}, {_over(counts)}")
        ax.set_title(f"{dataset}, {pair}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"Accuracy against the collected budget ({experiment or 'all experiments'})")
    fig.tight_layout()
    shown, text = drawn(fig), axes_text(fig)
    paths = save_figure(fig, results, f"budget-{_safe(experiment or 'all')}", uri, ids)
    return Plotted(paths, pd.DataFrame(points), shown, text)


COMPUTE_X = {"flops": ("train_flops", "training FLOPs spent by the run (every network, forward and backward; log scale)"),
             "wall": ("wall_seconds", "wall-clock seconds of the run (this machine; log scale)")}


def plot_compute(uri: str, results: Path, experiment: str | None, x: str = "flops",
                 metric: str = "test_accuracy") -> Plotted:
    """Accuracy against the compute a run spent (``train_flops``, or ``wall_seconds`` with ``x='wall'``).

    One point per finished cell run (every seed its own point), one colour per method (a method's
    objectives count as methods), the teacher as a dotted line: the equal-budget view.
    """
    if x not in COMPUTE_X:
        raise DfkdError(f"bad x {x!r}; allowed: {', '.join(COMPUTE_X)}")
    key, xlabel = COMPUTE_X[x]
    frame, ids = load_runs(uri, experiment, kinds=("cell",))
    column = f"metrics.{key}"
    if column not in frame.columns or frame[column].notna().sum() == 0:
        hint = "; plot against wall-clock time with --x wall" if x == "flops" else ""
        raise DfkdError(f"no finished run of {experiment or 'the store'} has metric {key!r}{hint}")
    data = _metric_rows(frame, metric)
    data = data[data[column].notna() & (data[column].astype(float) > 0)]
    data["x"] = data[column].astype(float)
    colors = _colors(data["label"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 5.0))
    for label, group in data.groupby("label"):
        ax.scatter(group["x"], group["value"], color=colors[label], alpha=0.8, label=f"{label} ({len(group)} runs)")
    teacher = _teacher_line(ax, data)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)}, one point per run ({len(data)} runs)")
    datasets = ", ".join(sorted(set(data["tags.dataset"])))
    ax.set_title(f"Accuracy against {'training FLOPs' if x == 'flops' else 'wall-clock time'}: "
                 f"{experiment or 'all experiments'} ({datasets})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    shown, text = drawn(fig), axes_text(fig)
    points = data[["run_id", "label", "tags.budget", "tags.seed", "x", "value"]].rename(
        columns={"tags.budget": "budget", "tags.seed": "seed", "value": "y"}).reset_index(drop=True)
    if teacher is not None:
        points = pd.concat([points, pd.DataFrame([{"label": "teacher", "y": teacher["mean"]}])], ignore_index=True)
    paths = save_figure(fig, results, f"compute-{_safe(experiment or 'all')}-{x}", uri, ids)
    return Plotted(paths, points, shown, text)


def plot_curves(uri: str, results: Path, experiment: str | None, metric: str = "val_accuracy") -> list[Path]:
    """A metric logged at every evaluation (validation accuracy by default, or a ``probe/*`` diagnostic of
    :mod:`methods.core.probe`) against iteration, one line per method (mean ± std band over seeds), per
    (dataset, pair, budget).  Runs that never logged ``metric`` are left out; none at all is a one-line error."""
    frame, ids = load_runs(uri, experiment, kinds=("cell",))
    client = tracking.open_client(uri)
    plt = _pyplot()
    scale = 100.0 if metric in FRACTION_METRICS else 1.0
    suffix = "" if metric == "val_accuracy" else "-" + _safe(metric)
    paths: list[Path] = []
    for (dataset, pair, budget), group in frame.groupby(["tags.dataset", "tags.pair", "tags.budget"]):
        curves: dict[str, pd.DataFrame] = {}
        for method, runs in group.groupby("tags.method"):
            series = [pd.Series({m.step: scale * m.value for m in history})
                      for history in (client.get_metric_history(run_id, metric) for run_id in runs["run_id"])
                      if history]
            if series:
                curves[str(method)] = pd.concat(series, axis=1).sort_index()
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for method, table in curves.items():
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
                                           f"{_safe(pair)}-c{budget}{suffix}", uri, ids)
    if not paths:
        raise DfkdError(f"no run of experiment {experiment or '(all)'} logged metric {metric!r}; "
                        f"per-evaluation metrics: {', '.join(EVALUATION_METRICS)}, loss/<term>")
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
