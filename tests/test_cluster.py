"""cluster/: the examples read the way DeepSpeed reads them, and the launch scripts refuse a bad setup by name.

The scripts' real runs are in test_multinode.py (train_node.sh), test_tracking_server.py (mlflow_server.sh) and
test_pipeline_cluster.py (ray_head.sh, ray_worker.sh, ray_stop.sh).
"""

import os
import random
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launch import REPO, launcher_env

from training.core.distributed import cleanup, init_distributed


def test_hostfile_example_is_what_deepspeed_parses():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(REPO / "cluster/hostfile.example"))
    assert list(pool) == ["node001", "node002", "node003", "node004"] and set(pool.values()) == {8}


def test_deepspeed_env_example_is_key_value_lines_only():
    # deepspeed's ssh launcher splits every line at its first '=' (a comment or blank line would crash it)
    lines = (REPO / "cluster/deepspeed_env.example").read_text().splitlines()
    keys = [line.split("=", 1)[0] for line in lines]
    assert all("=" in line and re.fullmatch(r"[A-Z_][A-Z0-9_]*", k) for line, k in zip(lines, keys)), lines
    assert {"MLFLOW_TRACKING_URI", "VQD_DIST_TIMEOUT", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS"} <= set(keys)


def run_node_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "cluster/train_node.sh", *args], cwd=REPO, env={**launcher_env(), **env},
                          capture_output=True, text=True, timeout=60)


def test_train_node_refuses_a_missing_hostfile_or_a_node_rank_outside_it(tmp_path):
    out = run_node_script("0", "127.0.0.1", "training/train.py", HOSTFILE=str(tmp_path / "nope"))
    assert out.returncode == 2 and "no hostfile at" in out.stderr and "hostfile.example" in out.stderr
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# comment\nnode0 slots=1\n\nnode1 slots=1\n")
    out = run_node_script("2", "127.0.0.1", "training/train.py", HOSTFILE=str(hostfile))
    assert out.returncode == 2 and "NODE_RANK must be 0..1 for the 2 nodes" in out.stderr
    out = run_node_script("0", "127.0.0.1", HOSTFILE=str(hostfile))
    assert out.returncode == 2 and "usage:" in out.stderr


# ---- the SLURM script, under a stand-in for srun and scontrol (SLURM itself is not installed on a test machine)

SRUN = '''#!/usr/bin/env python3
"""srun on one machine: start the step's tasks with the variables srun gives each task; --kill-on-bad-exit."""
import os, subprocess, sys, time
args, opts = sys.argv[1:], {}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
nodes = os.environ["SLURM_JOB_NODELIST"].split(",")
ntasks = int(opts.get("ntasks", os.environ["SLURM_NTASKS"]))
per_node = int(opts.get("ntasks-per-node", os.environ["SLURM_NTASKS_PER_NODE"]))
procs = []
for i in range(ntasks):
    env = {**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i % per_node), "SLURM_NODEID": str(i // per_node),
           "SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(per_node),
           "SLURM_STEP_NODELIST": ",".join(nodes[: -(-ntasks // per_node)])}
    procs.append(subprocess.Popen(args, env=env))
while any(p.poll() is None for p in procs):
    if any(p.returncode for p in procs):
        for p in procs:
            p.kill()
    time.sleep(0.1)
sys.exit(max(abs(p.returncode) for p in procs))
'''
SCONTROL = '''#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && tr ',' '\\n' <<< "$3"
'''
PROBE = '''import os, sys
sys.path.insert(0, os.getcwd())
from training.core.distributed import all_reduce_mean, barrier, cleanup, init_distributed
info = init_distributed()
mean = all_reduce_mean({"rank": float(info.rank)}, info.device)["rank"]
print(f"probe rank={info.rank} world={info.world_size} local={info.local_rank}/{info.local_world_size} "
      f"master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} mean={mean}", flush=True)
barrier()  # as the trainers end: no rank tears the group down while another still talks to it
cleanup()  # leaving with a live gloo group can abort the interpreter at exit ("terminate called ...")
'''


def free_job_id() -> int:
    """A job id whose port (20000 + id % 20000, the sbatch's rule) is free now: a fixed id collides with the
    sockets an earlier test left in TIME_WAIT."""
    for _ in range(100):
        job_id = random.randrange(1, 20000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port in 20000-39999")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launch,nodelist,per_node", [("srun", "127.0.0.1", 2), ("deepspeed", "127.0.0.1,localhost", 1)])
def test_slurm_script_gives_every_rank_its_place(tmp_path, launch, nodelist, per_node):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "probe.py").write_text(PROBE)
    job_id = free_job_id()
    env = {**launcher_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "LAUNCH": launch, "TMPDIR": str(tmp_path),
           "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": "2",
           "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NNODES": str(2 // per_node)}
    out = subprocess.run(["bash", "cluster/train_slurm.sbatch", str(tmp_path / "probe.py")], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:]
    probes = sorted(re.findall(r"probe (rank=\S+ world=\S+ local=\S+ master=\S+ mean=[0-9.]+)", out.stdout))
    # the master is the first node of the list and the port follows the job id (20000 + id % 20000)
    local = ["0/2", "1/2"] if per_node == 2 else ["0/1", "0/1"]
    assert probes == [f"rank={r} world=2 local={local[r]} master=127.0.0.1:{20000 + job_id % 20000} mean=0.5" for r in (0, 1)], probes


def test_one_rank_in_process_leaves_no_rendezvous_variables_behind(monkeypatch):
    """A one-rank run inside a caller's process (a test, a notebook) exports RANK, MASTER_PORT & co. for the
    rendezvous; cleanup() must take them back, or every program the caller launches later inherits them."""
    import torch.distributed as dist


    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # the caller's own: stays
    assert not dist.is_initialized()
    info = init_distributed(use_deepspeed=False, cpu_threads=1)
    assert (info.rank, info.world_size) == (0, 1) and dist.is_initialized()
    assert os.environ["RANK"] == "0" and int(os.environ["MASTER_PORT"]) > 0
    cleanup()
    assert not dist.is_initialized()
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"} & set(os.environ)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"


# ---- the Ray scripts' token and their refusals (their real cluster runs are in test_pipeline_cluster.py)

def ray_script(script: str, home, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in launcher_env().items() if not k.startswith("RAY_")}
    return subprocess.run(["bash", f"cluster/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**base, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                               **env})


def test_ray_token_is_made_once_readable_by_its_owner_only(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    made = ray_script("ray_token.sh", home)
    token = home / ".ray/auth_token"
    assert made.returncode == 0 and made.stdout.strip() == str(token), made.stderr
    assert "made a Ray token" in made.stderr and re.fullmatch(r"[0-9a-f]{64}", token.read_text().strip())
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    secret = token.read_text()
    again = ray_script("ray_token.sh", home)
    assert again.returncode == 0 and again.stderr == "" and token.read_text() == secret  # kept, never replaced
    token.chmod(0o644)  # as `ray get-auth-token --generate` leaves it under a common umask
    narrowed = ray_script("ray_token.sh", home)
    assert narrowed.returncode == 0 and "readable by its owner only" in narrowed.stderr
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == secret
    # a token given another way is used as it is
    assert ray_script("ray_token.sh", home, RAY_AUTH_TOKEN="x" * 64).stdout.strip() == "RAY_AUTH_TOKEN"
    missing = ray_script("ray_token.sh", home, RAY_AUTH_TOKEN_PATH=str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: RAY_AUTH_TOKEN_PATH=")
    assert missing.stderr.count("\n") == 1


def test_ray_scripts_refuse_a_bad_setting_in_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    head = ray_script("ray_head.sh", home, RAY_AUTH_MODE="on")
    assert head.returncode == 2 and "RAY_AUTH_MODE=on: expected token (the default) or disabled" in head.stderr
    stop = ray_script("ray_stop.sh", home, "--force")
    assert stop.returncode == 2 and "usage: cluster/ray_stop.sh [--temp-dir=DIR]" in stop.stderr
    # a folder no Ray node was started with: nothing to stop, and nothing of anyone else's is touched
    stop = ray_script("ray_stop.sh", home, f"--temp-dir={tmp_path}/none")
    assert stop.returncode == 0 and "no Ray processes started with" in stop.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    worker = ray_script("ray_worker.sh", home, closed)
    assert worker.returncode == 2 and worker.stderr.startswith(f"error: no Ray head answers at {closed}")
    assert worker.stderr.count("\n") == 1


def test_ray_cluster_yaml_is_what_the_ray_launcher_accepts_and_starts_the_scripts():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster/ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert any("cluster/ray_head.sh" in c for c in config["head_start_ray_commands"])
    assert any("cluster/ray_worker.sh $RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # every node gets the head's token


# ---- the tracking server's authentication set-up (the server itself runs in test_tracking_server.py)

def run_mlflow_auth(auth_dir, **env: str) -> subprocess.CompletedProcess:
    full = {**launcher_env(), **env}
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        if name not in env:
            full.pop(name, None)
    return subprocess.run([sys.executable, "cluster/mlflow_auth.py", str(auth_dir), "--uri", "http://node001:5000"],
                          cwd=REPO, env=full, capture_output=True, text=True, timeout=120)


@pytest.fixture
def mlflow_auth(monkeypatch):
    """cluster/mlflow_auth.py's main, in this process (MLflow's server modules are imported once, not per call)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlflow_auth", REPO / "cluster/mlflow_auth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return module.main


def admin_logs_in(auth_dir, password: str) -> bool:
    """Whether MLflow's auth store (the one the server reads) accepts the admin with `password`."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{auth_dir / 'basic_auth.db'}")
    return store.authenticate_user("admin", password) and store.get_user("admin").is_admin


def test_mlflow_auth_makes_private_credentials_and_the_file_sets_the_admin_password(tmp_path, mlflow_auth, capsys,
                                                                                     monkeypatch):
    import configparser

    auth = tmp_path / "auth"
    assert mlflow_auth([str(auth), "--uri", "http://node001:5000"]) == 0
    out = capsys.readouterr()
    creds = auth / "credentials"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(creds)  # MLflow's own credentials-file format: a node can use a copy as ~/.mlflow/credentials
    user, password = parser["mlflow"]["mlflow_tracking_username"], parser["mlflow"]["mlflow_tracking_password"]
    assert user == "admin" and len(password) >= 24
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600 and stat.S_IMODE(auth.stat().st_mode) == 0o700
    assert stat.S_IMODE((auth / "flask_secret_key").stat().st_mode) == 0o600
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(auth / "basic_auth.ini")
    assert dict(ini["mlflow"]) == {"default_permission": "READ", "database_uri": f"sqlite:///{auth}/basic_auth.db",
                                   "admin_username": "admin",
                                   "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth"}
    assert password not in out.out + out.err + (auth / "basic_auth.ini").read_text()
    assert "export MLFLOW_TRACKING_URI=http://node001:5000" in out.out
    assert f"install -D -m 600 {creds} ~/.mlflow/credentials" in out.out
    assert admin_logs_in(auth, password)

    # a changed file changes the admin's password at the next start; the old one no longer logs in
    creds.write_text(creds.read_text().replace(password, "a-new-password-1234"))
    assert mlflow_auth([str(auth)]) == 0 and "password set to the configured one" in capsys.readouterr().out
    assert admin_logs_in(auth, "a-new-password-1234") and not admin_logs_in(auth, password)
    # the environment, when it sets the password, wins over the file (which is left as it is)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-environment")
    assert mlflow_auth([str(auth)]) == 0
    assert "MLFLOW_TRACKING_PASSWORD=<$MLFLOW_AUTH_ADMIN_PASSWORD>" in capsys.readouterr().out
    assert admin_logs_in(auth, "from-the-environment") and "a-new-password-1234" in creds.read_text()


def test_mlflow_auth_refuses_a_readable_file_or_a_short_password(tmp_path):
    auth = tmp_path / "auth"
    auth.mkdir()
    (auth / "credentials").write_text("[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = "
                                      "long-enough-password\n")
    (auth / "credentials").chmod(0o644)
    out = run_mlflow_auth(auth)
    assert out.returncode == 2 and out.stderr.strip() == (f"error: {auth}/credentials is readable by others (mode 644): "
                                                          f"chmod 600 {auth}/credentials")
    out = run_mlflow_auth(tmp_path / "other", MLFLOW_AUTH_ADMIN_PASSWORD="short")
    assert out.returncode == 2 and out.stderr.strip() == ("error: the admin password from MLFLOW_AUTH_ADMIN_PASSWORD "
                                                          "is shorter than MLflow's minimum of 12 characters")
    assert not (tmp_path / "other" / "credentials").exists()
