"""``dfkd-bench reproduce``: a method's paper recipe on the paper's pair, beside the published number.

The request becomes an in-memory grid (the method's ``paper`` profile, the pair of the reference
entry, the paper's collected budget, the seeds) that runs through the grid runner, so it is
tracked in MLflow and a re-run skips finished cells.  The finished cells, read back from MLflow,
are summarised (mean ± sample std over seeds of the last and the best-val test accuracy) and set
beside the reference of :mod:`benchmark.references` (spec §5) with the gap to each one's teacher
and a verdict.  The verdict is taken on the best-val test accuracy, the nearest honest equivalent
of the papers' best-on-test numbers (spec §1.5, §5); the last-iterate verdict is shown too.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from methods.core.errors import DfkdError
from methods.core.method import CollectedUse
from methods.core.registry import get_method

from . import zoo
from .data import get_spec
from .grid import BUILTIN_PAIRS, BudgetEntry, DatasetEntry, Grid, MethodEntry, Plan, expand
from .references import DEFAULT_TOLERANCE, Reference, References, Unavailable, verdict
from .runner import CellRow

PROFILE = "paper"
# Collected examples for a method that needs them: HiDFD's n_collect default (spec §3.2, 5,000).
DEFAULT_COLLECTED = 5_000
NO_REFERENCE = "no verified reference (spec §5.7)"


@dataclass(frozen=True)
class Request:
    """What the user asked for (``reproduce --method M --dataset D ...``)."""

    method: str
    dataset: str
    seeds: tuple[int, ...] = (0, 1, 2)
    collected: int | None = None
    pair: tuple[str, str] | None = None
    iterations: int | None = None  # smoke tests only: not the paper recipe
    batch_size: int | None = None  # smoke tests only: not the paper recipe
    amp: str = "auto"


@dataclass(frozen=True)
class Target:
    """The resolved request: the pair, the collected budget and the reference to compare with."""

    request: Request
    teacher: str
    student: str
    collected: int
    reference: Reference | None
    others: tuple[Reference, ...] = ()  # further published values for the same method, dataset and pair
    unavailable: Unavailable | None = None

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def dataset(self) -> str:
        return self.request.dataset

    @property
    def pair(self) -> str:
        return f"{self.teacher}->{self.student}"

    @property
    def overridden(self) -> bool:
        """Whether iterations or batch size were overridden (then it is not the paper recipe)."""
        return self.request.iterations is not None or self.request.batch_size is not None

    @property
    def experiment(self) -> str:
        """The MLflow experiment: ``reproduce-<method>-<dataset>``, suffixed when the recipe is overridden."""
        name = f"reproduce-{self.method}-{self.dataset}"
        if self.request.iterations is not None:
            name += f"-i{self.request.iterations}"
        if self.request.batch_size is not None:
            name += f"-b{self.request.batch_size}"
        return name

    @property
    def reference_status(self) -> str:
        """``verified`` (a published number), ``unavailable`` (spec §5.7) or ``none`` (no entry)."""
        if self.reference is not None:
            return "verified"
        return "unavailable" if self.unavailable is not None else "none"

    def reference_message(self) -> str:
        if self.reference is not None:
            return reference_line(self.reference)
        if self.unavailable is not None:
            reason = self.unavailable.reason
            return reason if reason.startswith(NO_REFERENCE) else f"{NO_REFERENCE}: {reason}"
        return f"no published reference for {self.method} on {self.dataset} {self.pair} in the references file (spec §5)"


def reference_line(ref: Reference) -> str:
    """``DFAD Table 2 [spec §5.1]: DFAD, MNIST LeNet-5 -> LeNet-5-half: 98.30 ± 0.20 (teacher 98.90)``."""
    teacher = "" if ref.teacher_value is None else f" (teacher {ref.teacher_value:.2f})"
    return f"{ref.source}: {ref.paper_method}, {ref.paper_dataset} {ref.paper_pair}: {ref.describe_value()}{teacher}"


# ----------------------------------------------------------------------------- parsing the request
def parse_seeds(text: str) -> tuple[int, ...]:
    """``0,1,2`` → (0, 1, 2); a one-line error for anything else (empty, non-integer, negative, repeated)."""
    parts = [p.strip() for p in text.split(",")]
    seeds: list[int] = []
    for part in parts:
        if not (part.isascii() and part.isdigit()):
            raise DfkdError(f"bad --seeds {text!r}; expected comma-separated integers >= 0, e.g. 0,1,2")
        if int(part) in seeds:
            raise DfkdError(f"bad --seeds {text!r}: seed {int(part)} listed twice")
        seeds.append(int(part))
    return tuple(seeds)


def parse_pair(text: str) -> tuple[str, str]:
    """``teacher->student`` with both archs in the zoo."""
    parts = [p.strip() for p in text.split("->")]
    if len(parts) != 2 or not all(parts):
        raise DfkdError(f"bad --pair {text!r}; expected teacher->student, e.g. wrn-40-2->wrn-16-1")
    for arch in parts:
        zoo.check_arch(arch)
    return parts[0], parts[1]


def resolve(request: Request, references: References) -> Target:
    """The pair, budget and reference of ``request`` (one-line errors for what cannot run).

    The pair is the reference entry's (the primary one unless ``pair`` picks another); without a
    reference, the method's declared pair for the dataset, else the built-in one.  A method × dataset
    with neither is refused, naming what is known.
    """
    cls = get_method(request.method)
    get_spec(request.dataset)
    entries = references.for_cell(request.method, request.dataset)
    unavailable = references.unavailable_for(request.method)
    known_pair = dict(getattr(cls, "default_pairs", {}) or {}).get(request.dataset) or BUILTIN_PAIRS.get(request.dataset)
    chosen: Reference | None
    if request.pair is not None:
        chosen = next((e for e in entries if (e.teacher, e.student) == request.pair), None)
        pair = request.pair
    else:
        chosen = references.primary(request.method, request.dataset) or (entries[0] if entries else None)
        if chosen is not None:
            pair = (str(chosen.teacher), str(chosen.student))
        elif known_pair is not None:
            pair = (str(known_pair[0]), str(known_pair[1]))
        else:
            raise DfkdError(
                f"no reference and no known pair for {request.method} on {request.dataset}; give --pair teacher->student "
                f"(references exist for: {', '.join(references.known())})")
    collected = request.collected
    if collected is None:
        collected = DEFAULT_COLLECTED if cls.collected_use is CollectedUse.REQUIRED else 0
    others = tuple(e for e in entries if e is not chosen and (e.teacher, e.student) == pair)
    return Target(request, pair[0], pair[1], collected, chosen, others, unavailable)


def build_grid(target: Target) -> Grid:
    """The in-memory grid of ``target``: one method with its ``paper`` profile, one pair, one budget, the seeds."""
    r = target.request
    return Grid(
        name=target.experiment,
        methods=(MethodEntry(r.method),),
        datasets=(DatasetEntry(r.dataset, ((target.teacher, target.student),)),),
        budgets=(BudgetEntry(target.collected),),
        seeds=r.seeds,
        profile=PROFILE,
        amp=r.amp,
        iterations=r.iterations,
        batch_size=r.batch_size,
        description=f"reproduce {r.method} on {r.dataset}: paper profile, {target.pair}",
        source=f"reproduce --method {r.method} --dataset {r.dataset}",
    )


def plan_for(target: Target) -> Plan:
    """The grid expanded; a cell the method refuses (budget, pair, profile) is a one-line error, not a skip."""
    plan = expand(build_grid(target))
    if not plan.cells:
        reason = plan.skipped[0].reason if plan.skipped else "no cell"
        raise DfkdError(f"cannot reproduce {target.method} on {target.dataset}: {reason}")
    return plan


# ----------------------------------------------------------------------------- our numbers
@dataclass(frozen=True)
class Stats:
    """Mean and sample standard deviation (``None`` below two values) of a list of numbers."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return cls(None, None, 0)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    def describe(self, digits: int = 2) -> str:
        if self.mean is None:
            return "–"
        return f"{self.mean:.{digits}f}" + ("" if self.std is None else f" ± {self.std:.{digits}f}")

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass(frozen=True)
class Ours:
    """Our finished cells, in % (read back from MLflow by the grid runner)."""

    cells: tuple[dict[str, Any], ...]
    last: Stats
    best_val: Stats
    teacher: Stats
    wall: Stats

    @property
    def finished_seeds(self) -> list[int]:
        return [c["seed"] for c in self.cells if c["status"] == "FINISHED"]


def _pct(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else 100 * value


def summarize(rows: Sequence[CellRow]) -> Ours:
    """Mean ± sample std over the FINISHED cells of the last and the best-val test accuracy (%)."""
    cells = []
    for row in rows:
        m = row.metrics
        cells.append({
            "seed": row.cell.spec.seed, "cell_id": row.cell.cell_id, "status": row.status, "run_id": row.run_id,
            "test_accuracy": _pct(m.get("test_accuracy")), "best_val_test_accuracy": _pct(m.get("best_val_test_accuracy")),
            "teacher_accuracy": _pct(m.get("teacher_accuracy")), "wall_seconds": m.get("wall_seconds"),
            "error": row.error,
        })
    done = [c for c in cells if c["status"] == "FINISHED"]
    return Ours(
        cells=tuple(cells),
        last=Stats.of([c["test_accuracy"] for c in done]),
        best_val=Stats.of([c["best_val_test_accuracy"] for c in done]),
        teacher=Stats.of([c["teacher_accuracy"] for c in done]),
        wall=Stats.of([c["wall_seconds"] for c in done]),
    )


def hardware(device: torch.device) -> str:
    """The GPU's name, else the CPU's model and core count (for the README's "Reproduced" table)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model}, {os.cpu_count() or '?'} cores"


def precision(amp: str, device: torch.device) -> str:
    """``bf16`` or ``fp32``: what ``amp`` means on ``device`` (the rule of ``DistillContext.autocast``)."""
    on = (device.type == "cuda" and amp in ("auto", "bf16")) or (device.type == "cpu" and amp == "bf16")
    return "bf16" if on else "fp32"


# ----------------------------------------------------------------------------- the comparison
@dataclass
class Comparison:
    """Ours beside the published value: gaps to each teacher and the verdicts."""

    target: Target
    ours: Ours
    hardware: str
    precision: str = "fp32"
    tracking_uri: str = ""
    experiment_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ours_gap(self) -> dict[str, float | None]:
        """Our teacher minus ours (points), for the last and the best-val test accuracy."""
        t = self.ours.teacher.mean
        return {name: None if t is None or s.mean is None else t - s.mean
                for name, s in (("last", self.ours.last), ("best_val", self.ours.best_val))}

    @property
    def verdicts(self) -> dict[str, str] | None:
        """``within`` / ``below`` / ``above`` for best-val and last; ``None`` without a published number."""
        ref = self.target.reference
        if ref is None or ref.value is None:
            return None
        return {name: verdict(s.mean, ref.value, ref.spread)
                for name, s in (("best_val", self.ours.best_val), ("last", self.ours.last)) if s.mean is not None}

    def to_dict(self) -> dict[str, Any]:
        t, ref = self.target, self.target.reference
        return {
            "method": t.method, "dataset": t.dataset, "teacher": t.teacher, "student": t.student, "pair": t.pair,
            "profile": PROFILE, "collected": t.collected, "seeds": list(t.request.seeds),
            "recipe_overridden": {"iterations": t.request.iterations, "batch_size": t.request.batch_size}
            if t.overridden else None,
            "experiment": t.experiment, "experiment_id": self.experiment_id, "tracking_uri": self.tracking_uri,
            "units": "percent",
            "ours": {"finished_seeds": self.ours.finished_seeds, "last": self.ours.last.to_dict(),
                     "best_val": self.ours.best_val.to_dict(), "teacher": self.ours.teacher.mean,
                     "wall_seconds_per_run": self.ours.wall.mean, "gap_to_teacher": self.ours_gap,
                     "cells": list(self.ours.cells)},
            "reference_status": t.reference_status,
            "reference": None if ref is None else ref.to_dict(),
            "reference_message": t.reference_message(),
            "other_references": [e.to_dict() for e in t.others],
            "verdict": None if self.verdicts is None else {
                **self.verdicts, "tolerance": DEFAULT_TOLERANCE if ref is None or ref.spread is None else ref.spread,
                "rule": "within: |ours - paper| <= spread (0.5 points without one); decided on best-val"},
            "hardware": self.hardware, "amp": t.request.amp, "precision": self.precision,
            **self.extra,
        }

    def text(self) -> str:
        """The human-readable comparison (what ``reproduce`` prints)."""
        t, o, ref = self.target, self.ours, self.target.reference
        lines = [f"reproduce {t.method} on {t.dataset}: {PROFILE} profile, {t.pair}, collected {t.collected}, "
                 f"seeds {','.join(map(str, t.request.seeds))}, {self.precision}; experiment {t.experiment}"]
        if t.overridden:
            changed = {"iterations": t.request.iterations, "batch size": t.request.batch_size}
            what = ", ".join(f"{k} {v}" for k, v in changed.items() if v is not None)
            lines.append(f"NOTE: not the paper recipe ({what} overridden): a smoke test")
        teacher = "–" if o.teacher.mean is None else f"{o.teacher.mean:.2f}"
        wall = "–" if o.wall.mean is None else f"{o.wall.mean:.1f} s"
        lines.append(f"ours:  {len(o.finished_seeds)}/{len(o.cells)} seeds finished "
                     f"({','.join(map(str, o.finished_seeds)) or 'none'}): last {o.last.describe()}, "
                     f"best-val {o.best_val.describe()}; teacher {teacher}; wall {wall} per run; {self.hardware}")
        for cell in o.cells:
            if cell["status"] != "FINISHED":
                lines.append(f"  seed {cell['seed']}: {cell['status']}" + (f" ({cell['error'][:200]})" if cell["error"] else ""))
        lines.append(f"paper: {t.reference_message()}")
        if ref is not None and ref.notes:
            lines.append(f"       notes: {ref.notes}")
        gap = self.ours_gap
        ours_gap = ("–" if gap["best_val"] is None else f"{gap['best_val']:.2f} (best-val)") + \
                   ("" if gap["last"] is None else f" / {gap['last']:.2f} (last)")
        paper_gap = "–" if ref is None or ref.teacher_gap is None else f"{ref.teacher_gap:.2f}"
        lines.append(f"gap to teacher: ours {ours_gap}; paper {paper_gap}")
        if t.reference_status != "verified":
            lines.append("verdict: none (no published number to compare with)")
        elif self.verdicts:
            v = self.verdicts
            tolerance = DEFAULT_TOLERANCE if ref is None or ref.spread is None else ref.spread
            lines.append(f"verdict: {v.get('best_val', '–')} (best-val {o.best_val.describe()} vs "
                         f"{ref.describe_value() if ref else '–'}, tolerance ±{tolerance:.2f}); last: {v.get('last', '–')}")
        else:
            lines.append("verdict: none yet (no finished seed)")
        for other in t.others:
            lines.append(f"also published: {reference_line(other)}")
        return "\n".join(lines)

    def markdown(self, header: bool = True) -> str:
        """One row of the README's "Reproduced" table (with its header)."""
        return "\n".join(([MARKDOWN_HEADER, MARKDOWN_RULE] if header else []) + [self.markdown_row()])

    def markdown_row(self) -> str:
        t, o, ref = self.target, self.ours, self.target.reference
        seeds = ",".join(map(str, o.finished_seeds)) or "none"
        if ref is None:
            paper = NO_REFERENCE if t.unavailable is not None else "no reference"
        else:
            paper = f"{ref.describe_value()} ({ref.source})"
        gap = self.ours_gap["best_val"]
        ours_t = "–" if o.teacher.mean is None else f"{o.teacher.mean:.2f}"
        gap_ours = "–" if gap is None else f"{gap:.2f} (T {ours_t})"
        gap_paper = "–" if ref is None or ref.teacher_gap is None else f"{ref.teacher_gap:.2f} (T {ref.teacher_value:.2f})"
        verdicts = self.verdicts or {}
        wall = "–" if o.wall.mean is None else _duration(o.wall.mean)
        method = t.method + (" (smoke)" if t.overridden else "")
        cells = [method, t.dataset, t.pair, o.last.describe(), o.best_val.describe(), f"{len(o.finished_seeds)} ({seeds})",
                 paper, gap_ours, gap_paper, verdicts.get("best_val", "–"), f"{self.hardware}, {self.precision}", wall]
        return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


MARKDOWN_HEADER = ("| Method | Dataset | Pair | Ours last | Ours best-val | Seeds | Paper | Gap to teacher, ours (best-val) "
                   "| Gap to teacher, paper | Verdict | Hardware | Wall per run |")
MARKDOWN_RULE = "|" + "---|" * 12


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def list_lines(references: References) -> list[str]:
    """Every reference the package knows (``reproduce --list``): ``*`` marks the one ``reproduce`` compares with."""
    lines = [f"  {'method':<12}{'dataset':<11}{'pair (dfkd-bench)':<25}{'value':>14}{'teacher':>9}  source / as published"]
    for e in references.entries:
        method = e.method or "–"
        dataset = e.dataset or "–"
        pair = e.pair or "–"
        teacher = "–" if e.teacher_value is None else f"{e.teacher_value:.2f}"
        mark = "*" if e.primary else " "
        lines.append(f"{mark} {method:<12}{dataset:<11}{pair:<25}{e.describe_value():>14}{teacher:>9}  "
                     f"{e.source}; {e.paper_method}, {e.paper_dataset} {e.paper_pair}")
    for u in references.unavailable:
        lines.append(f"  {u.method:<12}{'any':<11}{'–':<25}{'no number':>14}{'–':>9}  {NO_REFERENCE}")
    lines.append(f"{len(references.entries)} published values ({sum(e.primary for e in references.entries)} marked * are "
                 "the ones `reproduce` compares with); – : no dfkd-bench counterpart (the source's names are on the right)")
    return lines
