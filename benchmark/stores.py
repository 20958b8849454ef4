"""The shared stores of a grid spread over machines: SQL URLs, their drivers, and whether they answer.

A grid run on several machines shares two stores: the work queue (an Optuna RDB storage, e.g.
PostgreSQL) and the MLflow tracking server.  Both are checked here before anything is written,
so that a typo or a missing driver is one line and exit code 2 instead of a traceback after
minutes of retries:

* a SQL URL whose driver is not installed (``postgresql://`` needs psycopg 3, the
  ``dfkd-bench[postgres]`` extra);
* a database that does not answer within :data:`CONNECT_TIMEOUT` seconds;
* a tracking URI that is not an MLflow server (nothing listening, or something else answering).

``postgresql://`` and ``postgres://`` are rewritten to ``postgresql+psycopg://``: SQLAlchemy
≥ 2.1 picks psycopg 3 for a plain ``postgresql://`` already, SQLAlchemy 2.0 picks psycopg2; the
rewrite makes the URL a user writes mean the driver the extra installs, whatever the version.
Imports no torch.
"""
from __future__ import annotations

from typing import Any

from methods.core.errors import DfkdError

CONNECT_TIMEOUT = 5  # seconds to wait for a database or a tracking server before giving up
SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mssql", "oracle")


def is_sql(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in SQL_SCHEMES


def sql_url(url: str) -> str:
    """``url`` with a plain PostgreSQL scheme bound to psycopg 3; other URLs unchanged."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def redact(url: str) -> str:
    """``url`` without its password, for messages and params."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (not a SQL URL: show it as it is, minus anything before '@')
        return url.split("://", 1)[0] + "://" + url.split("@")[-1] if "@" in url else url


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def connect_args(url: str) -> dict[str, Any]:
    """Driver options that make a connection attempt give up after :data:`CONNECT_TIMEOUT` s."""
    url = sql_url(url)
    if url.startswith("postgresql"):
        return {"connect_timeout": CONNECT_TIMEOUT}
    if url.startswith("mysql"):
        return {"connect_timeout": CONNECT_TIMEOUT}
    return {}


def check_driver(url: str, what: str) -> None:
    """A one-line :class:`DfkdError` when ``url`` is not a SQL URL SQLAlchemy knows or its driver is missing."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(sql_url(url))
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as error:
        raise DfkdError(f"bad {what} {redact(url)!r}: {_first_line(error)}; expected e.g. "
                        "postgresql://user:password@host:5432/db or sqlite:///path/queue.db") from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        extra = " install it with: pip install 'dfkd-bench[postgres]'" if parsed.drivername.startswith("postgresql") else ""
        raise DfkdError(f"{what} {redact(url)} needs the {parsed.get_driver_name()} driver, which is not installed "
                        f"({error.name or error});{extra}") from None


def check_database(url: str, what: str) -> None:
    """Driver present and the database answering within :data:`CONNECT_TIMEOUT` s (SQLite: driver only)."""
    check_driver(url, what)
    if url.startswith("sqlite"):
        return  # a local file, created on first use
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(sql_url(url), connect_args=connect_args(url), poolclass=NullPool)
    try:
        with engine.connect():
            pass
    except Exception as error:  # noqa: BLE001  (any driver's connection error)
        raise DfkdError(f"cannot reach the {what} {redact(url)} within {CONNECT_TIMEOUT} s: {_first_line(error)}") from None
    finally:
        engine.dispose()


def check_tracking(uri: str) -> None:
    """The tracking URI answers as MLflow does: a server (``http(s)://``) or a database with its driver."""
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    elif is_sql(uri):
        check_database(uri, "tracking store")


def check_server(uri: str) -> None:
    """``GET /api/2.0/mlflow/experiments/search`` answers with MLflow's JSON within :data:`CONNECT_TIMEOUT` s."""
    import requests
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)
    auth = (creds.username, creds.password) if creds.username else None
    headers = {"Authorization": f"Bearer {creds.token}"} if creds.token else None
    endpoint = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    try:
        response = requests.get(endpoint, params={"max_results": 1}, auth=auth, headers=headers,
                                timeout=CONNECT_TIMEOUT, verify=not creds.ignore_tls_verification)
    except requests.RequestException as error:
        raise DfkdError(f"cannot reach the MLflow tracking server {uri} within {CONNECT_TIMEOUT} s: "
                        f"{type(error).__name__}; start it (mlflow server ...) or fix --tracking-uri") from None
    if response.status_code in (401, 403):
        raise DfkdError(f"the MLflow tracking server {uri} refused our credentials (HTTP {response.status_code}); "
                        "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict):
        raise DfkdError(f"{uri} is not an MLflow tracking server (GET /api/2.0/mlflow/experiments/search answered "
                        f"HTTP {response.status_code}{'' if isinstance(body, dict) else ', not JSON'}); fix --tracking-uri")


def check_stores(tracking_uri: str, storage: str) -> None:
    """Both stores of a grid, checked before anything is written."""
    check_database(storage, "queue storage")
    check_tracking(tracking_uri)
