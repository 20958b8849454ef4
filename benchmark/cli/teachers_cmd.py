"""``dfkd-bench teachers train|list|push``: the teacher cache under ``results/teachers``, shared through MLflow."""
from __future__ import annotations

import dataclasses
import json
import sys

import click

from methods.core.errors import DfkdError

from .. import zoo
from ..data import get_spec, load_task
from ..settings import Settings
from ..teachers import default_recipe, list_teachers, teacher_dir, timed_train
from .app import common_options, main


@main.group("teachers")
def teachers_group() -> None:
    """Train, list and push (to a tracking server, for every machine) cached teachers."""


@teachers_group.command("train")
@click.option("--dataset", required=True, help="Dataset name, e.g. mnist.")
@click.option("--arch", required=True, help="Zoo architecture, e.g. lenet5.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the recipe's epochs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--download", is_flag=True, help="Let torchvision download the dataset.")
@click.option("--force", is_flag=True, help="Retrain although cached (the old teacher is kept aside).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@common_options
def train_command(dataset: str, arch: str, epochs: int | None, seed: int, download: bool, force: bool,
                  as_json: bool, settings: Settings) -> None:
    """Train a teacher with the documented recipe, evaluate it and cache it.

    Example: dfkd-bench teachers train --dataset mnist --arch lenet5
    """
    get_spec(dataset)
    zoo.check_arch(arch)
    if (teacher_dir(settings.results, dataset, arch) / "manifest.json").exists() and not force:
        raise DfkdError(
            f"a teacher for {dataset}/{arch} is already cached in {teacher_dir(settings.results, dataset, arch)}; "
            "pass --force to retrain (the old one is kept aside)"
        )
    recipe = default_recipe(dataset)
    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=epochs)
    data = load_task(dataset, settings.data_dir, download=download, device=settings.torch_device)

    def report(epoch: int, metrics: dict[str, float]) -> None:
        click.echo(f"epoch {epoch}/{recipe.epochs}: loss {metrics['loss']:.4f}  val {100 * metrics['val_accuracy']:.2f}%",
                   err=True)

    manifest = timed_train(settings.results, dataset, arch, data, recipe, seed, settings.torch_device, report)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    else:
        click.echo(f"{dataset}/{arch}: test {100 * manifest['test_accuracy']:.2f}%  val {100 * manifest['val_accuracy']:.2f}%  "
                   f"in {manifest['train_seconds']:.1f} s  -> {teacher_dir(settings.results, dataset, arch)}")


@teachers_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@common_options
def list_command(as_json: bool, settings: Settings) -> None:
    """Show cached teachers.

    Example: dfkd-bench teachers list --json
    """
    found = list_teachers(settings.results)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"no cached teachers under {settings.results / 'teachers'}", file=sys.stderr)
        return
    click.echo(f"{'dataset':<14}{'arch':<13}{'test':>8}{'val':>8}{'epochs':>8}{'seed':>6}{'|z| noise/real':>16}"
               f"{'noise classes':>15}  sha256")
    for m in found:
        click.echo(f"{m['dataset']:<14}{m['arch']:<13}{100 * m['test_accuracy']:>7.2f}%{100 * m['val_accuracy']:>7.2f}%"
                   f"{m['recipe']['epochs']:>8}{m['seed']:>6}{_noise_columns(m)}  {m['sha256'][:12]}")
    if any("noise_response" in m for m in found):
        click.echo("|z| noise/real: the teacher's mean |logit| on N(0, 1) inputs over that on validation images "
                   "(near 1: noise is answered as confidently as data, which generator methods exploit); "
                   "noise classes: coverage of its argmax on the noise (1 = all classes, 0 = one).")


def _noise_columns(manifest: dict[str, object]) -> str:
    """The two noise-response columns (benchmark.teacher_response); dashes for teachers cached before them."""
    response = manifest.get("noise_response")
    if not isinstance(response, dict):
        return f"{'-':>16}{'-':>15}"
    ratio = f"{response['noise_logit_abs']:.1f}/{response['real_logit_abs']:.1f} ({response['noise_to_real']:.2f})"
    return f"{ratio:>16}{response['noise_class_coverage']:>15.2f}"


@teachers_group.command("push")
@click.option("--dataset", required=True, help="Dataset name, e.g. mnist.")
@click.option("--arch", required=True, help="Zoo architecture, e.g. lenet5.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", required=True,
              help="MLflow tracking server (env MLFLOW_TRACKING_URI), e.g. http://127.0.0.1:5000.")
@click.option("--json", "as_json", is_flag=True, help="Print run id, teacher id and sha256 as JSON.")
@common_options
def push_command(dataset: str, arch: str, tracking_uri: str, as_json: bool, settings: Settings) -> None:
    """Store the cached teacher (weights + manifest, sha256 checked) in the tracking server's artifacts.

    Workers of a grid that lack the teacher pull it from there (checksum verified) instead of
    training their own; the grid's first invocation fixes which teacher every cell uses.

    Example: dfkd-bench teachers push --dataset mnist --arch lenet5 --tracking-uri http://127.0.0.1:5000
    """
    from .. import teacher_store
    from ..stores import check_tracking
    from ..teachers import verified_manifest
    from ..tracking import open_client, teacher_id

    get_spec(dataset)
    zoo.check_arch(arch)
    verified_manifest(settings.results, dataset, arch)  # absent or corrupt: one line, before contacting anything
    check_tracking(tracking_uri)
    run_id, manifest, new = teacher_store.push(open_client(tracking_uri), settings.results, dataset, arch)
    if as_json:
        click.echo(json.dumps({"run_id": run_id, "teacher_id": teacher_id(manifest), "sha256": manifest["sha256"],
                               "new": new}))
        return
    state = "pushed" if new else "already in the store"
    click.echo(f"{teacher_id(manifest)} {state}: run {run_id} of experiment {teacher_store.EXPERIMENT} "
               f"in {tracking_uri} (sha256 {manifest['sha256']})")
