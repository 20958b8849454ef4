"""Several machines for real: a PostgreSQL work queue, an MLflow server, one teacher, submitit launchers.

The module fixtures start a throwaway PostgreSQL (the machine's server binaries, as the
``postgres`` user when running as root) and an ``mlflow server`` backed by it, both bound to
127.0.0.1 on free ports and stopped at the end, also when a test fails.  Two ``dfkd-bench run``
processes with separate results folders ("two machines") split a grid through them while one
of them is killed with SIGKILL in the middle of a cell.
"""
from __future__ import annotations

import collections
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from benchmark import teacher_store, tracking
from benchmark.cli import main
from benchmark.grid import expand, load_grid
from benchmark.launchers import SlurmOptions, make_executor, parse_slurm_time
from benchmark.teachers import sha256_of, teacher_dir
from benchmark.workqueue import open_storage
from methods.core.errors import DfkdError

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
PG_CANDIDATES = [Path(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def postgres_bin() -> Path | None:
    """The folder of the PostgreSQL server binaries (initdb, pg_ctl), or ``None``."""
    on_path = shutil.which("pg_ctl")
    for folder in [*PG_CANDIDATES, *([Path(on_path).parent] if on_path else [])]:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def run_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    for key in ("MLFLOW_TRACKING_URI", "DFKD_QUEUE_STORAGE", "DFKD_RESULTS"):
        env.pop(key, None)
    return env


# ----------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def postgres() -> str:
    """A throwaway PostgreSQL on a free loopback port: its URL without database name.

    Run as the ``postgres`` system user when we are root (initdb refuses root); its data folder
    lives in a fresh folder under the system temp dir that this user can write.  Stopped
    (``-m immediate``) and removed at the end of the module, also after a failure.
    """
    folder = postgres_bin()
    if folder is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH")
    root = Path(tempfile.mkdtemp(prefix="dfkd-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"
    started = False
    try:
        subprocess.run([*prefix, str(folder / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        for _ in range(3):  # a free port can be taken between our look and the server's bind
            port = free_port()
            options = f"-c listen_addresses={LOOPBACK} -p {port} -k {root} -c fsync=off -c full_page_writes=off"
            proc = subprocess.run([*prefix, str(folder / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                                   "-o", options, "start"], capture_output=True, text=True, timeout=90)
            if proc.returncode == 0:
                started = True
                break
        assert started, f"PostgreSQL did not start: {proc.stdout[-1000:]} {log.read_text()[-2000:] if log.exists() else ''}"
        url = f"postgresql://postgres@{LOOPBACK}:{port}"
        import psycopg

        with psycopg.connect(f"{url}/postgres", autocommit=True, connect_timeout=10) as conn:
            for name in ("mlflow", "queue"):
                conn.execute(f"CREATE DATABASE {name}")
        yield url
    finally:
        if started:
            subprocess.run([*prefix, str(folder / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``mlflow server`` on 127.0.0.1 with the PostgreSQL database ``mlflow`` as backend store and a
    tmp folder as artifact store (``--serve-artifacts``: clients up- and download through the
    server, so machines need no shared folder).  Its process group is stopped at the end."""
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    log = open(artifacts.parent / "mlflow-server.log", "w")  # noqa: SIM115  (closed in the finalizer)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{postgres.replace('postgresql', 'postgresql+psycopg', 1)}/mlflow",
         "--artifacts-destination", str(artifacts), "--serve-artifacts", "--host", LOOPBACK, "--port", str(port),
         "--workers", "1"],
        env=run_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    uri = f"http://{LOOPBACK}:{port}"
    try:
        import requests

        def up() -> bool:
            assert proc.poll() is None, f"mlflow server exited: {Path(log.name).read_text()[-3000:]}"
            try:
                return requests.get(f"{uri}/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, 240, "the MLflow server", every=0.5)
        yield uri
    finally:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
        log.close()


def machine(tmp_path: Path, name: str, teachers_from: Path | None) -> Path:
    """A machine's own results folder: with a copy of the cached LeNet-5 teacher, or empty."""
    results = tmp_path / name / "results"
    results.mkdir(parents=True)
    if teachers_from is not None:
        shutil.copytree(teacher_dir(teachers_from, "mnist", "lenet5"), teacher_dir(results, "mnist", "lenet5"))
    return results


def write_grid(folder: Path, text: str) -> Path:
    path = folder / "grid.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def cli(args: list[str], data_root: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmark", *args, "--data-dir", str(data_root), "--device", "cpu"],
                            cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def trials(storage: str | object):
    """Every trial of every study in the queue ``storage`` (a URL or an open storage)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    store = open_storage(storage, 1) if isinstance(storage, str) else storage
    out = []
    for summary in optuna.get_all_study_summaries(store):
        out += optuna.load_study(study_name=summary.study_name, storage=store).get_trials(deepcopy=False)
    return out


# ----------------------------------------------------------------------------- two machines
MACHINES = """\
name: machines
seeds: [0, 1]
budgets: [100]
datasets: [mnist]
methods:
  - {name: kd-collected, iterations: 20, overrides: {objective: kd, eval_every: 10}}
  - {name: kd-real, iterations: 100, budgets: [0], seeds: [0], overrides: {eval_every: 50}}
"""


@pytest.mark.slow
def test_two_machines_split_a_grid_through_postgres_and_mlflow_and_survive_sigkill(
        tmp_path: Path, postgres: str, mlflow_server: str, results_dir: Path, data_root: Path) -> None:
    started = time.monotonic()
    grid = write_grid(tmp_path, MACHINES)
    plan = expand(load_grid(grid))
    storage = f"{postgres}/queue"
    first, second = machine(tmp_path, "a", results_dir), machine(tmp_path, "b", None)
    sha = json.loads((teacher_dir(first, "mnist", "lenet5") / "manifest.json").read_text())["sha256"]
    push = CliRunner().invoke(main, ["teachers", "push", "--dataset", "mnist", "--arch", "lenet5", "--tracking-uri",
                                     mlflow_server, "--results", str(first), "--json"])
    assert push.exit_code == 0, push.output
    assert json.loads(push.output)["sha256"] == sha

    common = ["run", "--grid", str(grid), "--storage", storage, "--tracking-uri", mlflow_server, "--heartbeat", "1",
              "--no-train-teachers", "--json"]
    procs = {name: cli([*common, "--results", str(results)], data_root)
             for name, results in (("a", first), ("b", second))}
    by_pid = {p.pid: name for name, p in procs.items()}
    try:
        # The observable event: the long cell is RUNNING in the queue and has reported progress.
        queue = open_storage(storage, 1)

        def long_cell_running():
            for trial in trials(queue):
                attrs = trial.user_attrs
                if (trial.state.name == "RUNNING" and attrs.get("label", "").startswith("kd-real")
                        and attrs.get("progress") and attrs.get("run_id")):
                    return trial
            for name, proc in procs.items():
                assert proc.poll() is None, f"machine {name} exited early:\n{proc.communicate()[0][-3000:]}"
            return None

        victim_trial = wait_for(long_cell_running, 150, "the kd-real cell to run")
        pid = int(victim_trial.user_attrs["worker"].rsplit(":", 1)[1])
        victim = by_pid[pid]
        survivor = "b" if victim == "a" else "a"
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].communicate(timeout=30)
        out, _ = procs[survivor].communicate(timeout=150)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
    assert procs[survivor].returncode == 0, out[-3000:]
    wall = time.monotonic() - started

    client = tracking.open_client(mlflow_server)
    exp = tracking.find_experiment(client, "machines")
    runs = tracking.cell_runs(client, exp)
    per_cell = collections.Counter((r.data.tags["dfkd.cell_id"], r.info.status) for r in runs)
    for cell in plan.cells:  # exactly one FINISHED run per cell, none missing
        assert per_cell[(cell.cell_id, "FINISHED")] == 1, (cell.label, per_cell)
    assert {r.data.tags["dfkd.cell_id"] for r in runs} == {c.cell_id for c in plan.cells}
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = client.get_run(victim_trial.user_attrs["run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags["dfkd.worker"].endswith(f":{pid}")
    long_cell = victim_trial.user_attrs["cell_id"]
    finished = [r for r in runs if r.data.tags["dfkd.cell_id"] == long_cell and r.info.status == "FINISHED"]
    assert finished[0].data.tags["dfkd.worker"].endswith(f":{procs[survivor].pid}")
    # One teacher: the pushed one, pulled by the machine that had none, recorded by every cell.
    assert {r.data.params["teacher_sha256"] for r in runs} == {sha}
    assert {r.data.tags["dfkd.teacher.sha256"] for r in runs} == {sha}
    assert sha256_of(teacher_dir(second, "mnist", "lenet5") / "weights.pt") == sha
    assert client.get_experiment(exp).tags["dfkd.teacher.mnist/lenet5"] == sha
    # No shared files: neither machine has a local store.
    for results in (first, second):
        assert not (results / "mlflow.db").exists() and not (results / "queue.db").exists()
    print(f"two-machine test: {wall:.1f} s wall (servers already up); killed machine {victim}")


# ----------------------------------------------------------------------------- submitit
@pytest.mark.slow
def test_local_launcher_runs_each_cell_exactly_once_through_submitit(tmp_path: Path, results_dir: Path,
                                                                      data_root: Path) -> None:
    grid = write_grid(tmp_path, """\
        name: launcher
        iterations: 10
        seeds: [0, 1, 2]
        budgets: [100]
        datasets: [mnist]
        methods:
          - {name: kd-collected, overrides: {objective: kd, eval_every: 10}}
        """)
    results = machine(tmp_path, "a", results_dir)
    proc = cli(["run", "--grid", str(grid), "--launcher", "local", "--workers", "2", "--results", str(results),
                "--threads", "1", "--heartbeat", "2", "--json"], data_root)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "started 2 submitit local job(s)" in out
    plan = expand(load_grid(grid))
    client = tracking.open_client(tracking.default_tracking_uri(results))
    runs = tracking.cell_runs(client, tracking.find_experiment(client, "launcher"))
    assert sorted((r.data.tags["dfkd.cell_id"], r.info.status) for r in runs) == sorted(
        (c.cell_id, "FINISHED") for c in plan.cells)
    assert len(list((results / "submitit" / "launcher").glob("*_result.pkl"))) == 2  # both jobs ended normally


def test_slurm_launcher_submits_one_job_array_with_the_options(tmp_path: Path, results_dir: Path,
                                                               monkeypatch) -> None:
    """No Slurm here: ``srun`` is declared present, ``sbatch`` is replaced by ``echo``, and the sbatch script
    submitit wrote is read back."""
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))

    executor = make_executor("slurm", tmp_path / "sub", 3, "g", SlurmOptions("gpu", 1, "4:00:00"))
    assert {k: executor.parameters[k] for k in ("partition", "gpus_per_task", "time", "array_parallelism")} == {
        "partition": "gpu", "gpus_per_task": 1, "time": 240, "array_parallelism": 3}
    monkeypatch.setattr(submitit.SlurmExecutor, "_make_submission_command",
                        lambda self, path: ["echo", "Submitted batch job 4242"])
    grid = write_grid(tmp_path, """\
        name: slurm
        iterations: 10
        seeds: [0, 1, 2]
        budgets: [100]
        datasets: [mnist]
        methods:
          - {name: kd-collected, overrides: {objective: kd}}
        """)
    results = machine(tmp_path, "a", results_dir)
    result = CliRunner().invoke(main, ["run", "--grid", str(grid), "--launcher", "slurm", "--slurm-partition", "gpu",
                                       "--slurm-gpus-per-task", "1", "--slurm-time", "4:00:00", "--workers", "3",
                                       "--results", str(results), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "submitted 3 worker(s) as Slurm job array 4242" in result.output
    scripts = sorted({p.read_text() for p in (results / "submitit" / "slurm").rglob("*.sh")})
    assert len(scripts) == 1  # one sbatch script (submitit keeps a copy per job id): a job array, not three jobs
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1", "#SBATCH --time=240"):
        assert line in scripts[0], scripts[0]
    queued = trials(f"sqlite:///{results / 'queue.db'}")
    assert sorted(t.state.name for t in queued) == ["WAITING"] * 3
    client = tracking.open_client(tracking.default_tracking_uri(results))
    exp = tracking.find_experiment(client, "slurm")
    (parent,) = tracking.search(client, exp, "tags.`dfkd.kind` = 'grid'")
    assert parent.info.status == "FINISHED" and parent.data.tags["dfkd.slurm_job"] == "4242"

    # The grid is now fixed to this teacher: another teacher in the cache is refused, nothing written.
    weights = teacher_dir(results, "mnist", "lenet5") / "weights.pt"
    state = torch.load(weights, weights_only=True)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, weights)
    manifest_path = weights.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    old, manifest["sha256"] = manifest["sha256"], sha256_of(weights)
    manifest_path.write_text(json.dumps(manifest))
    before = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in results.rglob("*"))
    again = CliRunner().invoke(main, ["run", "--grid", str(grid), "--launcher", "slurm", "--workers", "3",
                                      "--results", str(results), "--device", "cpu"])
    assert again.exit_code == 2, again.output
    assert again.output.count("\n") == 1 and again.output.startswith("Error: the cached teacher mnist/lenet5@"), again.output
    assert f"differs from grid slurm's teacher @{old[:12]} (fixed by the grid's first invocation)" in again.output
    assert sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in results.rglob("*")) == before
    assert len(trials(f"sqlite:///{results / 'queue.db'}")) == 3


@pytest.mark.parametrize("text, minutes", [("4:00:00", 240), ("90", 90), ("1-12:00:00", 2160), ("2-0", 2880),
                                           ("0:30", 1), ("10:30", 11)])
def test_slurm_time_formats(text: str, minutes: int) -> None:
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["4h", "", "0", "1:2:3:4"])
def test_bad_slurm_time(text: str) -> None:
    with pytest.raises(DfkdError, match="bad --slurm-time"):
        parse_slurm_time(text)


# ----------------------------------------------------------------------------- teachers through the store
def test_push_then_pull_verifies_the_checksum(tmp_path: Path, results_dir: Path) -> None:
    first, second = machine(tmp_path, "a", results_dir), machine(tmp_path, "b", None)
    uri = tracking.default_tracking_uri(tmp_path / "store")
    client = tracking.open_client(uri)
    run_id, manifest, new = teacher_store.push(client, first, "mnist", "lenet5")
    assert new and teacher_store.push(client, first, "mnist", "lenet5")[:2] == (run_id, manifest)  # pushed once
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dfkd.teacher.sha256"] == manifest["sha256"]
    pulled = teacher_store.pull(client, second, "mnist", "lenet5", manifest["sha256"])
    assert pulled == manifest
    assert sha256_of(teacher_dir(second, "mnist", "lenet5") / "weights.pt") == manifest["sha256"]
    # A corrupted artifact is refused and leaves no teacher behind.
    third = machine(tmp_path, "c", None)
    stored = next((first / "mlartifacts" / teacher_store.EXPERIMENT).rglob("weights.pt"))  # a local store: the pusher's
    stored.write_bytes(stored.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(DfkdError, match="checksum mismatch for teacher mnist/lenet5 downloaded from run"):
        teacher_store.pull(client, third, "mnist", "lenet5", manifest["sha256"])
    assert not teacher_dir(third, "mnist", "lenet5").exists()
    with pytest.raises(DfkdError, match="neither cached here nor in the tracking store.*teachers push"):
        teacher_store.pull(client, third, "mnist", "lenet5", "0" * 64)


# ----------------------------------------------------------------------------- bad stores
class NotMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b"<html>not here</html>")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def web_page():
    """A loopback HTTP server that is not MLflow."""
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), NotMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("case, message", [
    ("unreachable-storage", "Error: cannot reach the queue storage postgresql://u:***@127.0.0.1:"),
    ("no-driver", "needs the psycopg driver, which is not installed (psycopg); install it with: pip install "
                  "'dfkd-bench[postgres]'"),
    ("no-server", "Error: cannot reach the MLflow tracking server http://127.0.0.1:"),
    ("not-mlflow", "is not an MLflow tracking server (GET /api/2.0/mlflow/experiments/search answered HTTP 404, not JSON)"),
])
def test_bad_stores_are_one_line_exit_2_and_write_nothing(case: str, message: str, tmp_path: Path, web_page: str,
                                                          monkeypatch) -> None:
    results = tmp_path / "results"
    args = ["run", "--grid", "smoke", "--results", str(results), "--device", "cpu"]
    closed = free_port()
    if case in ("unreachable-storage", "no-driver"):
        args += ["--storage", f"postgresql://u:secret@{LOOPBACK}:{closed}/queue"]
    if case == "no-driver":
        monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails as if not installed
    if case == "no-server":
        args += ["--tracking-uri", f"http://{LOOPBACK}:{closed}"]
    if case == "not-mlflow":
        args += ["--tracking-uri", web_page]
    started = time.monotonic()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert "secret" not in result.output
    assert not results.exists()  # nothing written
    assert time.monotonic() - started < 30  # failed fast


@pytest.mark.parametrize("case", ["no-server", "not-mlflow"])
def test_push_to_something_that_is_not_a_server_is_one_line_exit_2(case: str, tmp_path: Path, web_page: str,
                                                                    results_dir: Path) -> None:
    results = machine(tmp_path, "a", results_dir)
    uri = web_page if case == "not-mlflow" else f"http://{LOOPBACK}:{free_port()}"
    before = sorted(str(p) for p in results.rglob("*"))
    result = CliRunner().invoke(main, ["teachers", "push", "--dataset", "mnist", "--arch", "lenet5", "--tracking-uri", uri,
                                       "--results", str(results)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert ("is not an MLflow tracking server" if case == "not-mlflow" else "cannot reach the MLflow") in result.output
    assert sorted(str(p) for p in results.rglob("*")) == before


def test_a_worker_refuses_a_cell_whose_teacher_is_not_the_grids(tmp_path: Path) -> None:
    """The check in every cell (a teacher swapped under a running grid): one line naming both checksums."""
    from types import SimpleNamespace

    from benchmark.runner import RunnerConfig, Worker
    from benchmark.settings import Settings

    plan = expand(load_grid(write_grid(tmp_path, """\
        name: refuse
        iterations: 10
        budgets: [100]
        datasets: [mnist]
        methods: [{name: kd-collected, overrides: {objective: kd}}]
        """)))
    cell = plan.cells[0]
    config = RunnerConfig(results=str(tmp_path), data_dir=".", device="cpu", tracking_uri="", storage="", study="",
                          experiment_id="", parent_run_id="", code_version="", grid="refuse",
                          teachers=(("mnist", "lenet5", "a" * 64),))
    worker = SimpleNamespace(config=config, settings=Settings(tmp_path, Path("."), "cpu"))
    Worker.check_teacher(worker, cell, {"sha256": "a" * 64})  # the grid's teacher: accepted
    with pytest.raises(DfkdError) as error:
        Worker.check_teacher(worker, cell, {"sha256": "b" * 64})
    assert str(error.value).startswith(f"the cached teacher mnist/lenet5@{'b' * 12} ")
    assert f"differs from grid refuse's teacher @{'a' * 12}" in str(error.value) and "\n" not in str(error.value)
