"""Screenshot of a grid's runs page in the MLflow UI (a script, not a test).

Starts ``dfkd-bench ui`` on a results folder, opens the address it prints for the experiment in
headless Chromium (Debian: ``apt-get install chromium``) and saves a PNG, so that what a user sees
can be checked (and published) without a desktop::

    python -m benchmark.screenshot --results results --experiment default \\
        --out results/published/mlflow-ui-default.png [--view grouped] [--size 1800x1000]

The page is the experiment's runs table as ``dfkd-bench ui`` opens it: cell runs flat, sorted by
name, with test accuracy, best-val test accuracy, teacher accuracy, training FLOPs, wall seconds
and the other compared metrics as columns (``--view grouped``: the seeds of a cell grouped).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_browser(name: str | None) -> str:
    for candidate in ([name] if name else BROWSERS):
        path = shutil.which(candidate)
        if path:
            return path
    raise SystemExit(f"no Chromium found (tried {', '.join([name] if name else BROWSERS)}); "
                     "install one, e.g. apt-get install -y chromium")


def start_ui(results: Path, experiment: str, port: int, timeout: float) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """``dfkd-bench ui`` in its own process group; returns it and the pages it printed (view → URL)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "benchmark", "ui", "--results", str(results), "--port", str(port),
                             "--experiment", experiment], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    pages: dict[str, str] = {}
    assert proc.stdout is not None
    deadline = time.time() + timeout
    while len(pages) < 2 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"dfkd-bench ui exited ({proc.wait()}) before printing the runs page")
        if line.startswith(f"{experiment} (seeds grouped): "):
            pages["grouped"] = line.split(": ", 1)[1].strip()
        elif line.startswith(f"{experiment}: "):
            pages["cells"] = line.split(": ", 1)[1].strip()
        elif "no MLflow experiment" in line or line.startswith("Error"):
            raise SystemExit(line.strip())
    health = f"http://127.0.0.1:{port}/health"
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(health, timeout=5) as response:
                if response.status == 200:
                    return proc, pages
        except OSError:
            time.sleep(1.0)
    stop(proc)
    raise SystemExit(f"the MLflow UI did not answer on {health} within {timeout:.0f} s")


def stop(proc: subprocess.Popen[str]) -> None:
    """End the UI we started (its own process group: the server and its workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def screenshot(browser: str, url: str, out: Path, size: str, budget_ms: int, timeout: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    width, height = size.lower().split("x")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
               # RUNNING runs keep the page polling, so virtual time may never settle: a wall-clock stop too
               f"--timeout={budget_ms + 60_000}", f"--screenshot={out}", url]
    subprocess.run(command, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not out.is_file() or out.stat().st_size == 0:
        raise SystemExit(f"Chromium wrote no screenshot to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path(os.environ.get("DFKD_RESULTS", "results")))
    parser.add_argument("--experiment", default="default", help="the grid's MLflow experiment (default: default)")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default results/published/mlflow-ui-<experiment>.png)")
    parser.add_argument("--view", choices=("cells", "grouped"), default="cells")
    parser.add_argument("--size", default="1800x1000", help="browser window, WIDTHxHEIGHT")
    parser.add_argument("--port", type=int, default=None, help="UI port (default: a free one)")
    parser.add_argument("--browser", default=None, help="Chromium executable (default: found on PATH)")
    parser.add_argument("--render-ms", type=int, default=30_000, help="virtual time the page gets to render")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the UI to start and for Chromium")
    args = parser.parse_args(argv)
    out = args.out or Path("results") / "published" / f"mlflow-ui-{args.experiment}.png"
    browser = find_browser(args.browser)
    proc, pages = start_ui(args.results, args.experiment, args.port or free_port(), args.timeout)
    try:
        url = pages[args.view]
        screenshot(browser, url, out, args.size, args.render_ms, args.timeout)
    finally:
        stop(proc)
    print(f"{url}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
