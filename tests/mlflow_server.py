"""A real `mlflow server` process for tests, started the way a cluster starts it (cluster/mlflow_server.sh): a sqlite
database and an artifact store in one folder, on a free loopback port. It can be stopped and started again on the
same port and store, to test what training does while the server is away.

    from mlflow_server import MlflowServer, mlflow_server   # the fixture: one server per test module

    def test_x(mlflow_server):
        client = MlflowClient(tracking_uri=mlflow_server.uri)

    with MlflowServer(tmp_path / "mlflow") as server:       # a server of one's own
        server.stop(); ...; server.start()
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from launch import REPO, free_port


class MlflowServer:
    """cluster/mlflow_server.sh ROOT on 127.0.0.1:port, one worker; start() returns once /health answers."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.root.parent / f"{self.root.name}_server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> MlflowServer:
        env = {**os.environ, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(self.port), "MLFLOW_WORKERS": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(["bash", str(REPO / "cluster/mlflow_server.sh"), str(self.root)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start on {self.uri}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)
        return self

    def answers(self, host: str | None = None) -> bool:
        """True when GET /api/2.0/mlflow/experiments/search answers 200 (with `host` as the Host header if given)."""
        request = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Host": host} if host else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self) -> None:
        """End the server's process group (the shell, mlflow and its workers); SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        try:  # workers that outlived the shell
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One real tracking server for a test module."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow") / "store") as server:
        yield server
