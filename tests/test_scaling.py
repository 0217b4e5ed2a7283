"""benchmarks/scaling.py: the plan (every budget the recipe with only its steps changed, no wall-clock budget, the
recipe's global batch, one sampling setting for all) and docs/SCALING.md from finished and stopped runs."""

import json
from pathlib import Path

import pytest


def args(tmp_path, *extra):
    return ["--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "figs"), "--report",
            str(tmp_path / "SCALING.md"), "--json", str(tmp_path / "scaling.json"), *extra]


@pytest.mark.parametrize("ranks", [1, 2])
def test_plan_changes_only_the_steps(tmp_path, capsys, ranks):
    from scaling import main

    assert main(args(tmp_path, "--dry-run", "--ranks", str(ranks))) == 0
    lines = capsys.readouterr().out.splitlines()
    train = {line.split(":")[0]: line for line in lines if "training/train.py" in line}
    assert list(train) == ["base_16x_train", "base_1x_train", "base_4x_train"]  # the longest first
    for k, line in ((1, train["base_1x_train"]), (4, train["base_4x_train"]), (16, train["base_16x_train"])):
        assert f"--train.steps={900 * k} " in line and "--train.max_minutes=0" in line
        assert "--train.resume=auto" in line and f"--train.micro_batch_size={64 // ranks} " in line
        assert ("deepspeed.launcher.runner --num_gpus 2" in line) == (ranks == 2)
    sampled = [line for line in lines if "training/evaluate.py" in line or "training/sample.py" in line]
    assert len(sampled) == 9 and all("--steps 25 --truncation 0.5 --guidance 2 --purity --seed 0" in line
                                     for line in sampled)
    # each budget scored on held-out concepts and on as many seen ones
    assert sum("--split train" in line for line in sampled) == 3
    with pytest.raises(SystemExit):
        main(args(tmp_path, "--ranks", "3", "--dry-run"))  # 64 images do not divide among 3 ranks


def fake_run(runs: Path, k: int, step: int) -> None:
    """A run folder as train.py leaves it: an export of `step` and its metrics log."""
    (runs / f"base_{k}x" / "export").mkdir(parents=True)
    (runs / f"base_{k}x" / "export" / "provenance.json").write_text(json.dumps({"step": step}))
    log = [{"step": s, "samples_per_s": 128.0, "val/aux": 3.0 - s / 10000} for s in range(300, step + 1, 300)]
    (runs / f"base_{k}x" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


def fake_eval(folder: Path, subcat: float, cnn: float, split: str = "test") -> None:
    """An evaluation JSON in training/evaluate.py's layout (figures made up)."""
    def top(t, majority=0.149):
        return {"subcategory": {"top1": t, "n": 255, "chance": 0.0099, "majority": majority, "classes": 101},
                "category": {"top1": t + 0.3, "n": 255, "chance": 0.09, "majority": 0.70, "classes": 11}}

    folder.mkdir(parents=True)
    result = {"n_generated": 255, "sampling": {"steps": 25, "truncation": 0.5, "guidance_scale": 2.0, "purity": True},
              "fid_floor": {"fid": 61.0}, "reference_top1": {"real": top(0.72), "reconstructed": top(0.40)},
              "reference_top1_cnn": {"real": top(0.71), "reconstructed": top(0.35), "noise": top(0.06)},
              "forms": {"typed": {"fid": 150.0, "top1": top(subcat), "top1_cnn": top(cnn)}},
              "grid": str(folder / "grid.png")}
    (folder / f"{split}_n255.json").write_text(json.dumps(result))


def test_report_of_finished_and_stopped_runs(tmp_path):
    from scaling import main

    runs, figs = tmp_path / "runs", tmp_path / "figs"
    fake_run(runs, 1, 900)
    fake_eval(figs / "base_1x", 0.20, 0.18)
    fake_eval(figs / "base_1x_seen", 0.45, 0.52, split="train")
    fake_run(runs, 16, 6000)  # stopped: its newest export evaluated as base_16x_step6000
    fake_eval(figs / "base_16x_step6000", 0.33, 0.31)
    (figs / "base_16x_step6000_prompts.png").write_bytes(b"")
    assert main(args(tmp_path, "--report-only")) == 0
    page = (tmp_path / "SCALING.md").read_text()
    assert "| 1x (900 steps), held-out concepts, typed prompts | 900 | 0.50 | 2.910 | 150.0 (61.0) | 20.0% / 18.0% | 50.0% / 48.0% |" in page
    assert "| 1x (900 steps), seen concepts, typed prompts | 900 | 0.50 | 2.910 | 150.0 (61.0) | 45.0% / 52.0% |" in page
    assert "| 16x (14400 steps), stopped at step 6000, held-out concepts, typed prompts | 6000 | 0.50 | 2.400 |" in page
    assert "| 4x (3600 steps) | none |" in page and "not evaluated" in page
    assert "| their tokenizer reconstructions | | | | | 40.0% / 35.0% |" in page
    assert "| always the most common held-out class | | | | | 14.9% | 70.0% |" in page
    assert "figs/base_16x_step6000_prompts.png" in page and "its learning rate not yet decayed" in page
    assert "--train.steps=14400 --train.max_minutes=0" in page and "deepspeed --num_gpus 2 training/train_vqvae.py" in page
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert [b["evaluated_at_step"] for b in saved["budgets"]] == [None, None, 6000]
    assert saved["budgets"][0]["seen"]["forms"]["typed"]["top1_cnn"]["subcategory"]["top1"] == 0.52
    assert saved["cpu"]["capability"] and saved["commands"]["budgets"]["16"]
