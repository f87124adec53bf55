"""A real MLflow tracking server for tests, as the session-scoped fixture ``mlflow_server``.

Use it from ``conftest.py`` with ``pytest_plugins = ["tests.mlflow_server"]`` (or
``from tests.mlflow_server import mlflow_server  # noqa: F401``), then::

    def test_x(mlflow_server):
        client = MlflowClient(tracking_uri=mlflow_server.uri)

The server runs ``python -m mlflow server`` with a SQLite backend store and proxied artifact
serving (``--serve-artifacts --artifacts-destination <dir>``): new experiments get the artifact
root ``mlflow-artifacts:/``, so a client uploads and lists artifacts over HTTP through the server,
exactly as with a remote server, and never needs to see the server's disk.

While the fixture is active it sets, for this process and the server, each of these that is not
already set in the environment (so values chosen in ``conftest.py`` win):

- ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=1``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`` and
  ``MLFLOW_HTTP_REQUEST_TIMEOUT=10``: with MLflow's defaults (7 retries, factor 2, 120 s timeout)
  a call to a dead or stuck server blocks for minutes; with these it fails within seconds.
- ``MLFLOW_DISABLE_TELEMETRY=true`` and ``DO_NOT_TRACK=true``: nothing tries to reach the network.
  MLflow may decide on telemetry when first imported; set both in ``conftest.py`` at import time
  to be sure for this process too.

The server alone also gets ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 10.0

CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}
# Only for the server: MLflow 3.x otherwise starts a job runner with seven huey consumer
# processes (GenAI jobs) that tracking does not use.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass(frozen=True)
class MlflowServer:
    """A running server: ``uri`` is ``http://127.0.0.1:PORT``; the paths are its storage."""

    uri: str
    backend_store_uri: str
    artifacts_dir: Path
    log_path: Path
    pid: int


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(log_path: Path, limit: int = 4000) -> str:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return text[-limit:] or "(no output)"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the server's whole process group (uvicorn workers included), then kill it."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, SHUTDOWN_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def start_mlflow_server(
    root: Path, timeout_s: float = STARTUP_TIMEOUT_S, port: int | None = None
) -> tuple[MlflowServer, subprocess.Popen[bytes]]:
    """Start a server storing everything below ``root`` (on ``port``, default a free one; pass the
    port of a stopped server to restart it) and wait until ``GET /health`` is OK.

    Raises ``RuntimeError`` with the server's output if it exits or is not healthy in time.
    """
    port = free_port() if port is None else port
    uri = f"http://127.0.0.1:{port}"
    artifacts_dir = root / "artifacts"
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    backend_store_uri = f"sqlite:///{root / 'mlflow.db'}"
    log_path = root / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--serve-artifacts", "--artifacts-destination", str(artifacts_dir),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**CLIENT_ENV, **os.environ, **SERVER_ENV},
            start_new_session=True,  # own process group, so teardown reaches every worker
        )
    server = MlflowServer(uri, backend_store_uri, artifacts_dir, log_path, process.pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with code {process.returncode} before becoming healthy.\n"
                f"command: {' '.join(command)}\noutput:\n{_log_tail(log_path)}"
            )
        if _healthy(uri):
            return server, process
        time.sleep(0.25)
    _stop(process)
    raise RuntimeError(
        f"mlflow server at {uri} not healthy after {timeout_s:.0f} s.\n"
        f"command: {' '.join(command)}\noutput:\n{_log_tail(log_path)}"
    )


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """Yield a running MLflow server (``.uri``); stop its process group at session end."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CLIENT_ENV.items():
            if name not in os.environ:
                patch.setenv(name, value)
        server, process = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
        try:
            yield server
        finally:
            _stop(process)
