"""A real `mlflow server` process for tests, started the way a cluster starts it (cluster/mlflow_server.sh): a sqlite
database and an artifact store in one folder, on a free loopback port, behind MLflow's basic-auth app with the
admin credentials the script makes (or --no-auth). It can be stopped and started again on the same port and store,
to test what training does while the server is away.

    from mlflow_server import MlflowServer, mlflow_server   # the fixture: one server per test module, its
                                                            # credentials in os.environ while the module runs
    def test_x(mlflow_server):
        client = MlflowClient(tracking_uri=mlflow_server.uri)

    with MlflowServer(tmp_path / "mlflow") as server:       # a server of one's own: credentials in server.env
        server.stop(); ...; server.start()
"""

from __future__ import annotations

import base64
import configparser
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
    """cluster/mlflow_server.sh ROOT on 127.0.0.1:port, one worker; start() returns once the server answers a
    logged-in request. `admin_password` is handed to the script as $MLFLOW_AUTH_ADMIN_PASSWORD (known before the
    first start); without it the script makes ROOT/auth/credentials."""

    def __init__(self, root: Path, port: int | None = None, auth: bool = True, admin_password: str | None = None):
        self.root, self.port, self.auth, self.admin_password = Path(root), port or free_port(), auth, admin_password
        self.proc: subprocess.Popen | None = None
        self.log = self.root.parent / f"{self.root.name}_server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def credentials_file(self) -> Path:
        return self.root / "auth" / "credentials"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """(user, password) of the admin, None without authentication (or before the script made the file)."""
        if not self.auth:
            return None
        if self.admin_password:
            return "admin", self.admin_password
        if not self.credentials_file.is_file():
            return None
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(self.credentials_file)
        return parser["mlflow"]["mlflow_tracking_username"], parser["mlflow"]["mlflow_tracking_password"]

    @property
    def env(self) -> dict[str, str]:
        """The variables MLflow's client reads the credentials from."""
        user, password = self.credentials or ("", "")
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password} if user else {}

    def start(self, timeout: float = 240) -> MlflowServer:
        env = {**os.environ, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(self.port), "MLFLOW_WORKERS": "1"}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
            env.pop(name, None)
        if self.admin_password:
            env["MLFLOW_AUTH_ADMIN_PASSWORD"] = self.admin_password
        self.root.mkdir(parents=True, exist_ok=True)
        args = ["--no-auth"] if not self.auth else []
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(["bash", str(REPO / "cluster/mlflow_server.sh"), *args, str(self.root)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start on {self.uri}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)
        return self

    def status(self, host: str | None = None, credentials: tuple[str, str] | None | bool = True,
               path: str = "/api/2.0/mlflow/experiments/search?max_results=1") -> int | None:
        """The HTTP status of GET `path` (None: no answer), logged in as the admin (credentials=True), as a given
        (user, password), or not at all (None / False); with `host` as the Host header if given."""
        credentials = self.credentials if credentials is True else credentials or None
        headers = {"Host": host} if host else {}
        if credentials:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        try:
            with urllib.request.urlopen(urllib.request.Request(self.uri + path, headers=headers), timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return None

    def answers(self, host: str | None = None) -> bool:
        """True when a logged-in GET /api/2.0/mlflow/experiments/search answers 200 (`host`: the Host header)."""
        return self.status(host) == 200

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
    """One real tracking server for a test module, its admin credentials in os.environ meanwhile (where MLflow's
    client, and the programs the module launches, read them)."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow") / "store") as server, pytest.MonkeyPatch.context() as env:
        for name, value in server.env.items():
            env.setenv(name, value)
        yield server
