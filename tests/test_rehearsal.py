"""The cluster rehearsal (scripts/rehearse_cluster.sh) passes, and what it made is what the paper path makes: every
paper recipe built from metadata in its own format and encoded by the paper tokenizer config trained on the CC
images; the base trained as one job of two nodes with the Hugging Face CLIP folder's weights as its text tower;
every fine-tune a child of the base on the tracking server; the comparison, the pictures and the scores; and
nothing of it left running."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from launch import REPO
from PIL import Image
from safetensors.torch import load_file

RECIPES = ("cc3m", "cc12m", "laion-cartoon", "cub200", "oxford102", "mscoco")
FINETUNES = ("cub200", "laion_cartoon", "oxford102", "mscoco")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("rehearsal") / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "MASTER_", "VQD_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    out = subprocess.run(["bash", str(REPO / "scripts/rehearse_cluster.sh"), str(work)], env=env, capture_output=True,
                         text=True, timeout=2400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return work, out.stdout


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_the_paper_path_runs_as_written_at_miniature_scale(rehearsal):
    from mlflow.tracking import MlflowClient

    from vqd.clip_weights import hf_clip_text_to_open_clip

    work, stdout = rehearsal
    assert "rehearsal passed in" in stdout
    steps = [line.split("\t")[0] for line in (work / "logs/times.tsv").read_text().splitlines()]
    assert set(steps) >= {"cc3m_images", "tokenizer", *RECIPES, "base_node0", *(f"finetune_{f}" for f in FINETUNES),
                          "compare_base", "compare_finetunes", "sample", "evaluate"}

    # the paper tokenizer config, trained on the cc3m recipe's downloaded images (its default data.source), f8
    tokenizer = work / "runs/vqvae_f8_8192/export"
    trained = (work / "runs/vqvae_f8_8192/config.yaml").read_text()
    assert "source: data/cc3m/download" in trained and "num_embeddings: 8192" in trained
    sha = hashlib.sha256((tokenizer / "model.safetensors").read_bytes()).hexdigest()

    # every recipe: built on the Ray head the script started, all rows accounted for, both splits, that tokenizer
    cpus = len(os.sched_getaffinity(0))
    for recipe in RECIPES:
        manifest = json.loads((work / f"data/{recipe}/manifest.json").read_text())
        assert manifest["tokenizer"]["sha256"] == sha and manifest["tokenizer"]["grid"] == [4, 4]
        acc = manifest["statistics"]["accounting"]
        dropped = sum(n for reasons in acc["dropped"].values() for n in reasons.values())
        assert acc["rows"] == acc["samples"] + dropped and acc["samples"] > 0
        assert manifest["splits"]["train"]["samples"] > 0 and manifest["splits"]["test"]["samples"] > 0, recipe
        log = (work / f"logs/{recipe}.log").read_text()
        assert "ran on: cluster at " in log and f"1 node(s), {cpus} CPU(s)" in log, log[-2000:]
    laion = json.loads((work / "data/laion-cartoon/manifest.json").read_text())["statistics"]["accounting"]["dropped"]
    assert laion["filter"] == {"caption_include": 1, "clip_similarity": 1, "image_size": 1}  # LAION's columns read
    assert laion["download"] == {"http_404": 1}

    # the base: one job on two nodes, its text tower the Hugging Face folder's weights, read the way users pass them
    assert f"data: {work}/data/cc3m (manifest sha256" in (work / "logs/base_node0.log").read_text()
    from transformers import CLIPTextModel

    hf = CLIPTextModel.from_pretrained(work / "clip-vit-tiny")
    tower = hf_clip_text_to_open_clip(hf.state_dict(), hf.config.num_hidden_layers)
    base = load_file(work / "runs/base_cc/export/model.safetensors")
    for name, tensor in tower.items():
        torch.testing.assert_close(base[f"text_encoder.{name}"], tensor, rtol=0, atol=0)

    # the tracking server (its store, read after it stopped): the base under its login, every fine-tune its child
    assert oct((work / "mlflow/auth/credentials").stat().st_mode & 0o777) == "0o600"
    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow/mlflow.db")
    (base_run,) = client.search_runs([client.get_experiment_by_name("vqd-base").experiment_id])
    assert base_run.info.status == "FINISHED" and base_run.data.tags["world_size"] == "2"
    assert base_run.info.run_id == (work / "runs/base_cc/mlflow_run_id.txt").read_text().strip()
    tuned = client.search_runs([client.get_experiment_by_name("vqd-finetune").experiment_id])
    assert sorted(r.info.run_name for r in tuned) == sorted(f"finetune_{f}" for f in FINETUNES)
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == base_run.info.run_id for r in tuned)
    lineage = (work / "runs/compare/vqd-finetune/lineage.txt").read_text()
    assert lineage.startswith(f"base_cc ({base_run.info.run_id[:8]})") and all(f"finetune_{f} (" in lineage
                                                                            for f in FINETUNES)

    # a fine-tune's pictures and scores
    with Image.open(work / "out/finetune_cub200.png") as im:
        assert im.width > 32 and im.height > 32
    (scores,) = (work / "runs/finetune_cub200/export/eval").glob("*.json")
    result = json.loads(scores.read_text())
    assert result["forms"]["template"]["fid"] > 0 and result["n_generated"] == 8  # cub200's held-out class

    # nothing left running: servers, ranks, and the Ray head (its own temp folder, named in its log, is gone too)
    ray_temp = re.search(r"--temp-dir=(\S+)", (work / "logs/ray_head.log").read_text()).group(1)
    assert not Path(ray_temp).exists()
    left = [p for p in psutil.process_iter(["cmdline"])
            if str(work) in " ".join(p.info["cmdline"] or []) or ray_temp in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
