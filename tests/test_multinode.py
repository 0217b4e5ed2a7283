"""Multi-node training as a cluster runs it, on one machine: two "nodes" of one CPU rank each, each started on its
own by cluster/train_node.sh (deepspeed --no_ssh --node_rank N), meet at 127.0.0.1 and train as one job; a node
that dies takes the job down with a clear error, and a rank that hangs is given up on after the collective timeout.
"""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch import REPO, free_port, launch, launcher_env
from safetensors.torch import load_file
from token_data import write_token_dataset

TRAIN = "training/train.py"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_token_dataset(tmp_path_factory.mktemp("toy"), train=200, test=40, per_shard=25)


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    """A micro model on the toy set, fp32, every step logged; no sample grids (they are rank 0's alone)."""
    return ["--config", "configs/emoji_base.yaml", f"--data.path={data}", f"--train.run_dir={run}",
            "--tracking.experiment=multinode", "--model.size=micro", "--text.pretrained=null",
            "--train.micro_batch_size=16", "--train.precision=fp32", "--train.log_every=1", "--train.image_every=0",
            "--train.eval_every=0", "--optim.warmup_steps=2", "--train.num_workers=0", *extra]


class Nodes:
    """Two nodes of one rank each, as two independent cluster/train_node.sh processes (each in its own session,
    so that a whole node can be killed), configured the way a cluster is: a hostfile and a .deepspeed_env file."""

    def __init__(self, tmp_path: Path, env_lines: dict[str, str]):
        self.tmp = tmp_path
        (tmp_path / "hostfile").write_text("# two nodes of one rank\nnode0 slots=1\nnode1 slots=1\n")
        (tmp_path / "deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in env_lines.items()))
        self.env = {**launcher_env(), "HOSTFILE": str(tmp_path / "hostfile"), "MASTER_PORT": str(free_port()),
                    "NUM_GPUS": "1", "DS_ENV_FILE": str(tmp_path / "deepspeed_env")}
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], cwds: tuple[Path, Path] = (REPO, REPO)) -> None:
        """Both nodes, node r started from the folder cwds[r] (a node's own working folder)."""
        for rank in (0, 1):
            log = open(self.log_path(rank), "w")
            cmd = ["bash", str(REPO / "cluster/train_node.sh"), str(rank), "127.0.0.1", str(REPO / TRAIN), *args]
            self.procs.append(subprocess.Popen(cmd, cwd=cwds[rank], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def log_path(self, rank: int) -> Path:
        return self.tmp / f"node{rank}.log"

    def log(self, rank: int) -> str:
        return self.log_path(rank).read_text()

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        """Every process of that node: its launcher and its rank."""
        try:
            os.killpg(self.procs[rank].pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for rank, p in enumerate(self.procs):
            if p.poll() is None:
                self.kill(rank)
                p.wait()


@pytest.fixture
def nodes(tmp_path):
    made = []

    def make(env_lines: dict[str, str]) -> Nodes:
        made.append(Nodes(tmp_path, env_lines))
        return made[-1]
    yield make
    for n in made:
        n.stop_all()


def history(client, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_train_as_one_job(tmp_path, toy, nodes):
    from mlflow.tracking import MlflowClient

    steps = ["--train.steps=6", "--train.save_every=3"]
    db = tmp_path / "nodes.db"
    job = nodes({"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "VQD_DIST_TIMEOUT": "120"})
    job.start(train_args(toy, tmp_path / "run", *steps))
    codes = [p.wait(timeout=600) for p in job.procs]
    assert codes == [0, 0], job.log(0)[-3000:] + job.log(1)[-3000:]
    assert f"data: {toy.resolve()} (manifest sha256 " in job.log(0)  # rank 0 says which data, as an absolute path

    # one job: one MLflow run (found through the URI the env file gave every rank), one loss value per step
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert len(runs) == 1
    rid = runs[0].info.run_id
    assert runs[0].data.tags["world_size"] == "2" and runs[0].info.status == "FINISHED"
    loss = history(client, rid, "loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    # one export, on the store too
    assert (tmp_path / "run/export/model.safetensors").is_file()
    assert "export/model.safetensors" in {a.path for a in client.list_artifacts(rid, "export")}
    # both ranks stepped: each wrote its own state at every checkpoint, having read 6 batches of its shards
    for rank in (0, 1):
        state = torch.load(tmp_path / f"run/checkpoints/step_00000006/rank_{rank}.pt", weights_only=True)
        assert state["step"] == 6 and state["batches"] == 6

    # and it is the same job as two ranks on one node: the same losses and the same weights
    ref_db = tmp_path / "ref.db"
    launch(TRAIN, train_args(toy, tmp_path / "ref", *steps, f"--tracking.uri=sqlite:///{ref_db}"), ranks=2)
    ref_client = MlflowClient(tracking_uri=f"sqlite:///{ref_db}")
    ref_id = (tmp_path / "ref/mlflow_run_id.txt").read_text().strip()
    ref_loss = history(ref_client, ref_id, "loss")
    assert [v for _, v in loss] == pytest.approx([v for _, v in ref_loss], rel=1e-4)
    a, b = load_file(tmp_path / "run/export/model.safetensors"), load_file(tmp_path / "ref/export/model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-4, diff


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_dead_node_takes_the_job_down_with_a_clear_error(tmp_path, toy, nodes):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "nodes.db"
    job = nodes({"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "VQD_DIST_TIMEOUT": "60"})
    run = tmp_path / "run"
    job.start(train_args(toy, run, "--train.steps=100000", "--train.save_every=2"))
    deadline = time.time() + 400
    while not (run / "checkpoints/step_00000002/complete").is_file():  # both ranks are stepping
        assert time.time() < deadline and all(p.poll() is None for p in job.procs), job.log(0)[-3000:]
        time.sleep(0.2)
    job.kill(1)  # node 1, launcher and rank, mid-run
    killed = time.time()
    code = job.procs[0].wait(timeout=300)
    took = time.time() - killed
    log = job.log(0)
    assert code != 0
    assert took < 60, took  # the dead peer's connections close: no wait for the timeout
    assert "vqd: rank 0 of 2" in log and "--train.resume=auto" in log, log[-3000:]
    # the job left a resumable checkpoint behind
    assert (run / "checkpoints/step_00000002/rank_1.pt").is_file()
    # rank 0 marked its MLflow run FAILED on the way out
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert client.get_run((run / "mlflow_run_id.txt").read_text().strip()).info.status == "FAILED"


HANG = """
import os, signal, sys, time
import torch, torch.distributed as dist
from training.core.distributed import init_distributed
info = init_distributed(use_deepspeed=True)
group = dist.new_group([0, 1])  # made after init with no timeout of its own, as DeepSpeed makes its groups
x = torch.ones(4)
dist.all_reduce(x, group=group)
print(f"rank {info.rank} ready", flush=True)
if info.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # hangs: alive, connections open, never answers
started = time.time()
try:
    dist.all_reduce(x, group=group)
finally:
    print(f"rank {info.rank} waited {time.time() - started:.1f} s", flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nodes_that_see_different_data_refuse_to_start(tmp_path, nodes):
    # the paper configs' data.path is relative (data/cc3m): started from different folders, two nodes read two
    # different builds at the same relative path. Both ranks compare what they read and refuse, naming the node
    folders = (tmp_path / "node0", tmp_path / "node1")
    for seed, folder in enumerate(folders):
        write_token_dataset(folder / "data/toy", train=50, test=10, per_shard=25, seed=seed)
    job = nodes({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/nodes.db", "VQD_DIST_TIMEOUT": "120"})
    args = train_args(Path("data/toy"), tmp_path / "run", "--train.steps=2")
    args[1] = str(REPO / args[1])  # the config by its absolute path: the nodes do not start in the repository
    job.start(args, cwds=folders)
    codes = [p.wait(timeout=400) for p in job.procs]
    logs = job.log(0) + job.log(1)
    assert codes[0] != 0 and codes[1] != 0, logs[-3000:]
    host = socket.gethostname()
    line = next((x for x in logs.splitlines() if "the ranks read different data: " in x and " reads " in x), None)
    assert line is not None, logs[-3000:]
    for rank, folder in enumerate(folders):
        sha = hashlib.sha256((folder / "data/toy/manifest.json").read_bytes()).hexdigest()[:12]
        assert f"{host} (rank {rank}) reads {folder / 'data/toy'} (manifest sha256 {sha})" in line, line
    assert "on a filesystem every node sees" in line and "docs/cluster.md" in line
    assert f"data: {folders[0] / 'data/toy'} (manifest sha256" in job.log(0)  # rank 0's own line, before the check
    assert not (tmp_path / "run/checkpoints").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_rank_is_given_up_on_after_the_collective_timeout(tmp_path):
    env = {**launcher_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "LOCAL_RANK": "0", "VQD_DIST_TIMEOUT": "8"}
    procs = [subprocess.Popen([sys.executable, "-c", HANG], cwd=REPO, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=200)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode != 0, out
    waited = float(out.split("rank 0 waited ")[1].split()[0])
    assert 8 <= waited < 30, out
    assert "vqd: rank 0 of 2" in out and "VQD_DIST_TIMEOUT" in out and "timeout 8 s" in out, out
