"""The runner's work queue: an Optuna study on an RDB storage whose WAITING trials are grid cells.

Optuna already solves what a grid needs from a queue: an atomic WAITING → RUNNING pop, a
heartbeat per running trial, and re-enqueueing a trial whose worker stopped beating
(:class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`).  SQLite serves one machine (the
default, ``<results>/queue.db``); PostgreSQL or MySQL serve several (``postgresql://`` means psycopg 3,
see :mod:`benchmark.stores`; connections give up after a few seconds instead of hanging).

On SQLite every transaction starts with ``BEGIN IMMEDIATE``.  The Python driver's default opens a
transaction only at the first write, so two processes can both read the same trial as WAITING
and both mark it RUNNING: with four processes popping 300 trials from a plain SQLite storage,
five trials were handed out twice.  Imports no torch, so that a queue is cheap to open.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna

from .stores import connect_args, sql_url

QUEUE_DB = "queue.db"
DEFAULT_HEARTBEAT = 10  # seconds between heartbeats; a trial silent for 3× this is stale
MAX_RETRY = 3  # a cell whose worker died is re-enqueued this many times per invocation


def default_storage(results: Path) -> str:
    return f"sqlite:///{(Path(results) / QUEUE_DB).resolve()}"


def _retry_callback() -> tuple[str, Any]:
    """The stale-trial retry callback, under its Optuna ≥ 4.9 name or the older one."""
    try:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        return "heartbeat_stale_trial_callback", RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    except ImportError:  # Optuna < 4.9
        from optuna.storages import RetryFailedTrialCallback

        return "failed_trial_callback", RetryFailedTrialCallback(max_retry=MAX_RETRY)


def open_storage(url: str, heartbeat: int = DEFAULT_HEARTBEAT) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats every ``heartbeat`` s and a grace of 3 intervals."""
    url = sql_url(url)
    sqlite = url.startswith("sqlite")
    kwargs: dict[str, Any] = {"connect_args": connect_args(url), "pool_pre_ping": True}
    if sqlite:
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the driver issues no implicit BEGIN; we issue BEGIN IMMEDIATE below.
        kwargs = {"connect_args": {"timeout": 120, "isolation_level": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        key, callback = _retry_callback()
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat,
                                             grace_period=3 * heartbeat, **{key: callback})
    if sqlite:
        from sqlalchemy import event

        @event.listens_for(storage.engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        storage.engine.dispose()  # drop connections opened before the listener existed
    return storage


def fail_stale(study: optuna.Study) -> None:
    """Fail trials whose worker stopped beating; the retry callback enqueues them again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
