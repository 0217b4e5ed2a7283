"""Building on a Ray cluster started the way cluster/ documents it, on this machine: cluster/ray_head.sh, then
cluster/ray_worker.sh HEAD:PORT (one CPU each, so the work has to spread), build.py --address HEAD:PORT (or
RAY_ADDRESS), cluster/ray_stop.sh; with token authentication (the scripts' default) and without; and
cluster/ray_slurm.sbatch under stand-ins for srun and scontrol. Each cluster
gets a fresh home directory, so its token is the one the scripts made, and its own temp folder, so that
ray_stop.sh stops it and nothing else running on the machine.

A head that cannot be joined (no token, another token, another authentication mode, nothing listening, a
listener that never answers, a Ray Client address) is one line `error: ...` and exit 2."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import ray
from pipeline_fixtures import bad_server, tiny_png, tiny_tokenizer, write_recipe
from test_cluster import SCONTROL, SRUN

from data_pipeline.build import main as build_main
from vqd.errors import exit_on_user_error

REPO = Path(__file__).resolve().parents[1]
RAY_VARIABLES = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict:
    """This machine's environment with `home` as HOME, no Ray settings of its own, and the test's python first."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARIABLES}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", NUM_CPUS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", **extra)
    return env


def _run(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _build(env: dict, recipe: Path, out: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return _run([sys.executable, "data_pipeline/build.py", str(recipe), "--out", str(out), *args], env, timeout)


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """The stderr of a refused command: exit 2, one line `error: ...` holding every word, no traceback."""
    err = result.stderr.strip()
    assert result.returncode == 2 and err.startswith("error: ") and "\n" not in err, result.stderr[-3000:]
    assert all(w in err for w in words), err
    return err


def _node_processes(temp: Path) -> list[psutil.Process]:
    """The processes of the Ray nodes whose temp folders are inside `temp` (those naming the folder, or one of
    its nodes, as the head's Ray Client server does), and all their descendants."""
    ids = {p.name.rsplit("_", 1)[-1] for p in temp.glob("**/session_*/dashboard_agent_listen_port_*")}
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(temp) in cmd or any(f"--node-id={i}" in cmd for i in ids):
            roots.append(p)
    found = {p.pid: p for p in roots}
    for p in roots:
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in p.children(recursive=True)})
    return list(found.values())


def _running(procs: list[psutil.Process]) -> list[int]:
    alive = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
    return alive


@contextlib.contextmanager
def ray_cluster(tmp_path: Path, head_env: dict):
    """A head (cluster/ray_head.sh with head_env) and one worker (cluster/ray_worker.sh, head_env without
    RAY_AUTH_MODE: it follows the head) of one CPU each; yields (address, head temp folder, worker temp
    folder). Whatever cluster/ray_stop.sh left running is killed on the way out."""
    temp = Path(tempfile.mkdtemp(prefix="vqdray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    head_temp, worker_temp = temp / "h", temp / "w"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    try:
        head = _run(["bash", "cluster/ray_head.sh", f"--temp-dir={head_temp}", f"--dashboard-port={_free_port()}",
                     f"--ray-client-server-port={_free_port()}"], {**head_env, "RAY_PORT": str(port)})
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-3000:]
        worker_env = {k: v for k, v in head_env.items() if k != "RAY_AUTH_MODE"}
        worker = _run(["bash", "cluster/ray_worker.sh", address, f"--temp-dir={worker_temp}"], worker_env)
        assert worker.returncode == 0, worker.stderr[-3000:]
        # two live nodes, asked the way ray_slurm.sbatch waits for its workers
        wait = _run([sys.executable, "-m", "data_pipeline.ray_cluster", address, "--nodes", "2", "--wait", "120"],
                    worker_env)
        assert wait.returncode == 0, wait.stderr
        yield address, head_temp, worker_temp
    finally:
        leftovers = _node_processes(temp)
        for pid in _running(leftovers):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        psutil.wait_procs(leftovers, timeout=20)
        shutil.rmtree(temp, ignore_errors=True)


def _stop(env: dict, *temps: Path) -> None:
    """cluster/ray_stop.sh on each node's temp folder: afterwards, none of the nodes' processes runs."""
    procs = [p for t in temps for p in _node_processes(t)]
    assert len(procs) >= 4, procs  # at least a GCS, two raylets and their helpers
    for t in temps:
        stop = _run(["bash", "cluster/ray_stop.sh", f"--temp-dir={t}"], env, timeout=120)
        assert stop.returncode == 0 and "stopped the Ray node" in stop.stdout, stop.stdout + stop.stderr
    assert not _running(procs), f"Ray processes still running after ray_stop.sh: {_running(procs)}"


def _recipe(tmp_path: Path, base: str, rows: int) -> Path:
    lines = [f"{base}/ok/g{i}.png,picture {i}" for i in range(rows)] + [f"{base}/missing,gone"]
    (tmp_path / "meta.csv").write_text("url,caption\n" + "\n".join(lines) + "\n")
    return write_recipe(tmp_path / "cluster.yaml", tmp_path / "meta.csv",
                        download={"samples_per_shard": 2}, encode={"actors": 2, "samples_per_shard": 5})


@pytest.mark.slow
def test_build_on_a_two_node_cluster_with_token_authentication(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    env = _env(tmp_path / "home")  # RAY_AUTH_MODE unset: ray_head.sh's default, token
    files = {f"g{i}.png": tiny_png(400 + i) for i in range(12)}
    with bad_server(files) as base, ray_cluster(tmp_path, env) as (address, head_temp, worker_temp):
        token = tmp_path / "home/.ray/auth_token"
        assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600  # made by ray_head.sh, owner-only
        recipe = _recipe(tmp_path, base, 12)
        out = tmp_path / "out"
        build = _build(env, recipe, out, "--address", address, "--tokenizer", str(tokenizer))
        assert build.returncode == 0, build.stderr[-4000:]
        assert f"ran on: cluster at {address}: 2 node(s), 2 CPU(s)" in build.stdout, build.stdout

        # a node or a driver that does not hold the cluster's token, or will not use one, is refused by name
        stranger = _env(tmp_path / "stranger")
        worker = _run(["bash", "cluster/ray_worker.sh", address, f"--temp-dir={worker_temp}2"], stranger)
        _one_line_error(worker, "requires a token and there is none here", str(tmp_path / "stranger/.ray/auth_token"))
        wrong = _build({**env, "RAY_AUTH_TOKEN": "0" * 64}, recipe, tmp_path / "o1", "--address", address,
                       "--stages", "metadata")
        _one_line_error(wrong, "refused the token in RAY_AUTH_TOKEN", "copy the head's ~/.ray/auth_token")
        off = _build({**env, "RAY_AUTH_MODE": "disabled"}, recipe, tmp_path / "o2", "--address", address,
                      "--stages", "metadata")
        _one_line_error(off, "requires a token but RAY_AUTH_MODE=disabled here")
        _stop(env, worker_temp, head_temp)
        gone = _build(env, recipe, tmp_path / "o3", "--address", address, "--stages", "metadata")
        _one_line_error(gone, f"no Ray head answers at {address}", "cluster/ray_head.sh")

    manifest = json.loads((out / "manifest.json").read_text())
    acc = manifest["statistics"]["accounting"]
    assert acc["samples"] == 12 and acc["dropped"]["download"] == {"http_404": 1} and acc["rows"] == 13
    # two encode actors of one CPU each on two one-CPU nodes; every part names the node that encoded it. On an
    # idle machine the first actor can drain a job this small before the second has started, so one node may
    # have done all of it: the parts must name one or two nodes, never more
    nodes = {json.loads(p.read_text())["node"] for p in (out / "encode").glob("[0-9]*.json")}
    assert 1 <= len(nodes) <= 2 and all(nodes), nodes


@pytest.mark.slow
def test_a_cluster_without_authentication_is_joined_through_ray_address(tmp_path):
    env = _env(tmp_path / "home")
    # a token on this machine does not matter: the worker and the driver follow the head, which wants none
    (tmp_path / "home/.ray").mkdir(parents=True)
    (tmp_path / "home/.ray/auth_token").write_text("f" * 64)
    files = {f"g{i}.png": tiny_png(500 + i) for i in range(4)}
    with bad_server(files) as base, ray_cluster(tmp_path, {**env, "RAY_AUTH_MODE": "disabled"}) as cluster:
        address, head_temp, worker_temp = cluster
        recipe = _recipe(tmp_path, base, 4)
        # no --address: RAY_ADDRESS is the cluster, as for Ray's own tools
        build = _build({**env, "RAY_ADDRESS": address}, recipe, tmp_path / "out", "--stages", "metadata,filter")
        assert build.returncode == 0, build.stderr[-4000:]
        assert f"ran on: cluster at {address}: 2 node(s), 2 CPU(s)" in build.stdout, build.stdout
        assert "5 of 5 kept" in build.stdout, build.stdout
        strict = _build({**env, "RAY_AUTH_MODE": "token"}, recipe, tmp_path / "o1", "--address", address,
                        "--stages", "metadata")
        _one_line_error(strict, "runs without authentication but RAY_AUTH_MODE=token here")
        _stop(env, worker_temp, head_temp)


@pytest.mark.slow
def test_the_slurm_script_builds_on_the_cluster_it_starts(tmp_path):
    # SLURM itself is not installed here: srun and scontrol are stand-ins that run each step on this machine
    # (test_cluster.py's), and the job's two nodes are 127.0.0.1 and localhost
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    temp = Path(tempfile.mkdtemp(prefix="vqdray", dir="/tmp"))  # TMPDIR: both nodes' Ray folder is temp/ray
    env = _env(tmp_path / "home", TMPDIR=str(temp), RAY_PORT=str(_free_port()),
               HEAD_OPTIONS=f"--dashboard-port={_free_port()} --ray-client-server-port={_free_port()}",
               SLURM_JOB_NODELIST="127.0.0.1,localhost", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_ID="7")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    files = {f"g{i}.png": tiny_png(700 + i) for i in range(4)}
    job = None
    try:
        with bad_server(files) as base:
            recipe = _recipe(tmp_path, base, 4)
            with open(tmp_path / "job.log", "w") as log:  # not a pipe: the node steps outlive the script
                job = subprocess.Popen(["bash", "cluster/ray_slurm.sbatch", str(recipe), str(tmp_path / "out"),
                                        "--stages", "metadata,filter"], cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
                code = job.wait(timeout=900)
        out = (tmp_path / "job.log").read_text()
        assert code == 0, out[-4000:]
        token = tmp_path / "home/.ray/auth_token"
        assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600
        assert re.search(rf"ran on: cluster at [0-9.]+:{env['RAY_PORT']}: 2 node\(s\), 2 CPU\(s\)", out), out[-3000:]
        assert "5 of 5 kept" in out
        _stop(env, temp / "ray")  # the job's end on a real allocation; here ray_stop.sh on the nodes' folder
    finally:
        if job is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)  # the srun stand-ins and node scripts
        leftovers = _node_processes(temp)
        for pid in _running(leftovers):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        psutil.wait_procs(leftovers, timeout=20)
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def _silent_listener():
    """A port that accepts connections (the kernel completes the handshake) and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def _refused(capsys, recipe: Path, out: Path, *args: str) -> str:
    """build.py's main in this process (nothing of Ray starts before the head is asked): exit 2, one line."""
    with pytest.raises(SystemExit) as code:
        exit_on_user_error(build_main, [str(recipe), "--out", str(out), "--stages", "metadata", *args])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_a_head_that_cannot_be_joined_is_one_line(tmp_path, monkeypatch, capsys):
    for name in RAY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "meta.csv").write_text("url,caption\nhttp://127.0.0.1:1/a.png,a\n")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "meta.csv")
    closed = f"127.0.0.1:{_free_port()}"
    err = _refused(capsys, recipe, tmp_path / "o1", "--address", closed)
    assert f"no Ray head answers at {closed}" in err and "cluster/ray_head.sh" in err, err
    with _silent_listener() as silent:
        err = _refused(capsys, recipe, tmp_path / "o2", "--address", silent)
        assert f"the Ray head at {silent} did not answer within 10 s" in err, err
    err = _refused(capsys, recipe, tmp_path / "o3", "--address", "ray://127.0.0.1:10001")
    assert "--address=ray://127.0.0.1:10001 is a Ray Client address" in err and "--address HEAD:6379" in err, err
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert "RAY_ADDRESS=ray://head:10001 is a Ray Client address" in _refused(capsys, recipe, tmp_path / "o4")
    monkeypatch.setenv("RAY_ADDRESS", closed)  # RAY_ADDRESS alone is the cluster to join
    assert f"no Ray head answers at {closed}" in _refused(capsys, recipe, tmp_path / "o5")
    assert not ray.is_initialized()
