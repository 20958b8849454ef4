"""The speed script (a benchmark, not a timed test): it runs, reports, compares variants; malloc tuning."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from benchmark.speed import main as speed_main
from benchmark.speed import parse_variant


def test_speed_script_reports_every_variant_with_teacher_images() -> None:
    # tiny DFAD (B 8, ngf 4) on a random teacher: 3 iterations, 1 untimed; two variants in fresh processes
    result = CliRunner().invoke(speed_main, [
        "dfad", "--profile", "quick", "--dataset", "mnist", "--iterations", "3", "--warmup", "1",
        "--set", "batch_size=8", "--set", "ngf=4", "--compare", "malloc=default,threads=1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert [v["variant"] for v in out["variants"]] == ["malloc=default", "threads=1"]
    assert out["batch_size"] == 8 and out["timed_iterations"] == 2
    for row in out["variants"]:
        assert row["seconds_per_iteration"] > 0
        # DFAD: 5 student steps + 1 generator step, B images each, all through the teacher
        assert abs(row["teacher_images_per_second"] * row["seconds_per_iteration"] - 6 * 8) < 1e-6 * 48
    assert out["variants"][1]["threads"] == 1


def test_speed_script_rejects_bad_variants_in_one_line() -> None:
    result = CliRunner().invoke(speed_main, ["dfad", "--compare", "malloc=fast"])
    assert result.exit_code == 2 and "bad malloc='fast'; allowed: tuned, default, env" in result.output
    assert parse_variant("amp=bf16+threads=1") == {"amp": "bf16", "threads": "1"} and parse_variant("base") == {}


def test_malloc_tuning_applies_once_and_can_be_turned_off() -> None:
    code = "from benchmark.cpu_tuning import tune_malloc; print(tune_malloc(), tune_malloc())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DFKD_MALLOC": "default"}).stdout.split()
    assert on == ["True", "True"] and off == ["False", "False"]
