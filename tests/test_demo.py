"""The README's first command, end to end, in a copy of the checkout: every stage of scripts/emoji_demo.sh runs
(images, tokenizer, token shards, openmoji, text tower, base, fine-tune, pictures, evaluation, comparison) with small
step counts, then a second run reuses what the first built."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from launch import REPO, launcher_env

from vqd.sampling import load_sampling


def checkout_copy(dest: Path) -> Path:
    """The files git tracks (and new ones it does not ignore), as a fresh clone would have them."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_first_command_runs_every_stage_then_reuses_them(tmp_path):
    repo = checkout_copy(tmp_path / "repo")
    # the tokenizer and the base ask for more steps than their time budgets allow: both plan their own end
    env = {**launcher_env(), "PYTHONPATH": str(repo), "TOKENIZER_STEPS": "100000", "TOKENIZER_MINUTES": "0.15",
           "TEXT_STEPS": "20", "BASE_STEPS": "100000", "BASE_MINUTES": "0.2", "FINETUNE_STEPS": "4", "EVAL_N": "8",
           "LIMIT": "300", "OMP_NUM_THREADS": "1"}
    start = time.time()
    first = subprocess.run(["bash", "scripts/emoji_demo.sh"], cwd=repo, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=1500)
    first_seconds = time.time() - start
    assert first.returncode == 0, first.stdout[-6000:]
    for stage in range(1, 11):
        assert f"=== {stage}/10" in first.stdout
    aligned = json.loads((repo / "runs/text_emoji/export/align.json").read_text())
    assert aligned["steps"] == 20 and aligned["data"] == "data/emoji" and "val/typed_top1" in aligned
    base_config = (repo / "runs/emoji_base/export/config.yaml").read_text()
    assert "pretrained: runs/text_emoji/export/text.safetensors" in base_config  # the base read the aligned tower
    assert (repo / "out/demo_base.png").is_file() and (repo / "out/demo_openmoji.png").is_file()
    diagnosed = json.loads((repo / "out/diagnose_base/diagnose.json").read_text())
    assert "held-out" in {g["group"] for g in diagnosed["groups"]} and "house" in diagnosed["prompts"]
    assert (repo / "out/diagnose_base/diagnose.png").is_file()
    results = sorted((repo / "runs/emoji_base/export/eval").glob("*.json"))
    assert len(results) == 3  # guidance 1, 2 and 3
    for result in results:
        scored = json.loads(result.read_text())
        assert set(scored["forms"]) == {"template", "typed"} and scored["forms"]["typed"]["n_generated"] == 8
        assert scored["sampling"]["steps"] == 25 and scored["sampling"]["purity"]  # the export's own, from its config
    # the lowest FID became the export's sampling settings, and the pictures were drawn with them
    settings, chosen = load_sampling(repo / "runs/emoji_base/export")
    assert "the lowest FID of 3 settings" in chosen["how"] and settings.steps == 25 and settings.purity
    drawn = first.stdout.split("=== 9/10")[1]
    assert f"sampling: {settings.describe(100)} (defaults from runs/emoji_base/export/sampling.yaml" in drawn
    assert first.stdout.rstrip().endswith("python training/serve.py --model runs/emoji_base/export   "
                                          "# then open http://127.0.0.1:7860/")
    assert not (repo / "runs/emoji_openmoji/export/eval").exists()  # the fine-tune's evaluation is opt-in
    provenance = json.loads((repo / "runs/emoji_openmoji/export/provenance.json").read_text())
    base = json.loads((repo / "runs/emoji_base/export/provenance.json").read_text())
    assert provenance["base_run_id"] == base["mlflow_run_id"] and provenance["step"] == 4
    for run in ("vqvae_emoji", "emoji_base"):  # ended by the budget at a step both ranks planned, and saved there
        (last,) = sorted((repo / "runs" / run / "checkpoints").glob("step_*"))[-1:]
        progress = json.loads((last / "progress.json").read_text())
        assert progress["config_steps"] == 100000 and 5 < progress["step"] == progress["planned_steps"] < 1000, run
    assert base["step"] == progress["step"]
    assert "of 100000 (time budget 0.15 min)" in first.stdout and "of 100000 (time budget 0.2 min)" in first.stdout
    assert "mlflow ui" in first.stdout and (repo / "out/compare/curves.png").is_file()
    tree = (repo / "out/compare/lineage.txt").read_text().splitlines()  # tower -> base -> fine-tune
    assert [line.split(" (")[0] for line in tree] == ["text_emoji", "└── emoji_base", "    └── emoji_openmoji"], tree
    assert "val/typed_top1" in tree[0] and "val/vlb" in tree[1]

    # the second run trains and draws nothing again (checkpoints and exports stay as they were); asked to, it
    # evaluates the fine-tune on openmoji's held-out concepts too
    stamp = {p: p.stat().st_mtime for p in (repo / "runs").rglob("*.safetensors")}
    start = time.time()
    second = subprocess.run(["bash", "scripts/emoji_demo.sh"], cwd=repo, env={**env, "EVAL_FINETUNE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-6000:]
    assert {p: p.stat().st_mtime for p in (repo / "runs").rglob("*.safetensors")} == stamp
    # the fine-tune's evaluation writes its sampling settings, so its pictures are drawn again with them
    assert second.stdout.count("already evaluated") == 1 and second.stdout.count("already drawn") == 1
    assert "already diagnosed" in second.stdout and "already aligned" in second.stdout
    assert "Ray cluster" not in second.stdout  # the built data sets are read back without starting Ray
    results = sorted((repo / "runs/emoji_openmoji/export/eval").glob("*.json"))
    assert len(results) == 3 and all(json.loads(r.read_text())["data"].endswith("openmoji") for r in results)
    assert "training/evaluate.py" in load_sampling(repo / "runs/emoji_openmoji/export")[1]["how"]
    assert time.time() - start < 0.6 * first_seconds
