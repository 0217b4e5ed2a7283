"""A build on a two-node Ray cluster started on this machine as cluster/ documents: cluster/ray_head.sh, then
cluster/ray_worker.sh HEAD:PORT (one CPU each, so the work has to spread), then build.py --address HEAD:PORT."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from pipeline_fixtures import bad_server, tiny_png, tiny_tokenizer, write_recipe

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A cluster script in its own process group (ray start --block keeps every Ray process of the node in it)."""
    return subprocess.Popen(["bash", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _stop(procs: list[subprocess.Popen]) -> None:
    """End the process groups this test started: SIGTERM, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)


PROBE = """
import sys, time, ray
address, nodes, deadline = sys.argv[1], int(sys.argv[2]), time.time() + float(sys.argv[3])
while time.time() < deadline:
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        alive = sum(x["Alive"] for x in ray.nodes())
        ray.shutdown()
        if alive >= nodes:
            sys.exit(0)
    except Exception:  # the head is not up yet
        pass
    time.sleep(1)
sys.exit(f"no {nodes} live nodes at {address}")
"""


def _wait_for_nodes(address: str, env: dict, n: int, timeout: float = 180) -> None:
    """Until the cluster at `address` has n live nodes (a separate driver process, as a user would check)."""
    subprocess.run([sys.executable, "-c", PROBE, address, str(n), str(timeout)], env=env, check=True,
                   timeout=timeout + 60, capture_output=True)


@pytest.mark.slow
def test_build_on_a_two_node_ray_cluster(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    port, dashboard = _free_port(), _free_port()
    temp = Path(tempfile.mkdtemp(prefix="vqdray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, PYTHONPATH=str(REPO), NUM_CPUS="1", RAY_PORT=str(port), OMP_NUM_THREADS="1",
               RAY_AUTH_MODE="token")  # what cluster/ray_head.sh uses; ~/.ray/auth_token is this machine's token
    head = _start(["cluster/ray_head.sh", "--block", f"--temp-dir={temp}", f"--dashboard-port={dashboard}"],
                  env, tmp_path / "head.log")
    procs = [head]
    try:
        address = f"127.0.0.1:{port}"
        _wait_for_nodes(address, env, 1)
        procs.append(_start(["cluster/ray_worker.sh", address, "--block"], env, tmp_path / "worker.log"))
        _wait_for_nodes(address, env, 2)
        files = {f"g{i}.png": tiny_png(400 + i) for i in range(12)}
        with bad_server(files) as base:
            rows = [f"{base}/ok/g{i}.png,picture {i}" for i in range(12)] + [f"{base}/missing,gone"]
            (tmp_path / "meta.csv").write_text("url,caption\n" + "\n".join(rows) + "\n")
            recipe = write_recipe(tmp_path / "cluster.yaml", tmp_path / "meta.csv",
                                  download={"samples_per_shard": 2}, encode={"actors": 2, "samples_per_shard": 5})
            out = tmp_path / "out"
            build = subprocess.run([sys.executable, "data_pipeline/build.py", str(recipe), "--address", address,
                                    "--out", str(out), "--tokenizer", str(tokenizer)],
                                   cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert build.returncode == 0, build.stderr[-4000:]
    finally:
        _stop(procs)
        # Ray's daemons (GCS, raylet, workers) can outlive the launch scripts' process groups: end the ones of
        # this cluster, found by its own temp folder, and give them time to exit
        deadline = time.time() + 20
        while (leftovers := subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()) \
                and time.time() < deadline:
            for pid in leftovers:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        if not leftovers:
            shutil.rmtree(temp, ignore_errors=True)
    assert not leftovers, f"Ray processes of the test cluster still running: {leftovers}"
    manifest = json.loads((out / "manifest.json").read_text())
    acc = manifest["statistics"]["accounting"]
    assert acc["samples"] == 12 and acc["dropped"]["download"] == {"http_404": 1} and acc["rows"] == 13
    # two encode actors of one CPU each on two one-CPU nodes; every part names the node that encoded it. On an
    # idle machine the first actor can drain a job this small before the second has started, so one node may
    # have done all of it: the parts must name one or two nodes, never more
    nodes = {json.loads(p.read_text())["node"] for p in (out / "encode").glob("[0-9]*.json")}
    assert 1 <= len(nodes) <= 2 and all(nodes), nodes
