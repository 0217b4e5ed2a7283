"""benchmarks/paper_claims.py: the plan of every claim (dry run), the verdict rules on numbers made up to be clear
or not, and the whole driver on the toy token set (every claim trained, evaluated and written to RESULTS.md)."""

import json
import math
import re
from pathlib import Path

import pytest
from launch import REPO
from token_data import write_token_dataset


@pytest.fixture(scope="module")
def toy_configs(tmp_path_factory) -> tuple[Path, Path]:
    """A base recipe on the toy set (micro model) and a fine-tune recipe on a second toy set (same tokenizer)."""
    root = tmp_path_factory.mktemp("claims")
    emoji = write_token_dataset(root / "emoji", train=64, test=16, per_shard=16, images=True)
    openmoji = write_token_dataset(root / "openmoji", train=64, test=16, per_shard=16, seed=1, first_uid=1000,
                                   images=True)
    base = root / "base.yaml"
    base.write_text(f"""base: {REPO / 'configs/emoji_base.yaml'}
model: {{size: micro}}
text: {{pretrained: null}}
data: {{path: {emoji}}}
optim: {{lr: 3.0e-3, warmup_steps: 4}}
train: {{steps: 12, micro_batch_size: 16, precision: fp32, num_workers: 0, save_every: 1000, image_every: 0,
         eval_every: 0, log_every: 4}}
""")
    finetune = root / "finetune.yaml"
    finetune.write_text(f"""base: base.yaml
data: {{path: {openmoji}}}
train: {{steps: 6, init_from: {root / 'nowhere'}}}
""")
    return base, finetune


def driver_args(configs, tmp_path, *extra):
    return ["--base-config", str(configs[0]), "--finetune-config", str(configs[1]), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "RESULTS.md"), "--no-tracking", *extra]


def test_dry_run_plans_every_claim_with_one_n_and_seed(toy_configs, tmp_path, capsys):
    from paper_claims import main

    assert main(driver_args(toy_configs, tmp_path, "--dry-run", "--seed", "3", "--steps-scale", "0.5")) == 0
    out = capsys.readouterr().out
    train = [line for line in out.splitlines() if "training/train.py" in line]
    evals = [line for line in out.splitlines() if "training/evaluate.py" in line]
    names = {re.search(r"--train.run_dir=\S+/runs/(\S+)", line).group(1) for line in train}
    assert names == {"base", "base_seed1", "vq_ar", "mask_0", "mask_0.5", "mask_0.9", "mask_1", "openmoji_finetune",
                     "openmoji_scratch", "t10", "class", "uncond"}
    assert all("--train.steps=6 " in line for line in train if "openmoji" not in line)  # 12 x 0.5
    assert all("--train.steps=3 " in line and "--optim.warmup_steps=2 " in line for line in train if "openmoji" in line)
    assert all("--train.seed=3 " in line for line in train if "seed1" not in line)
    assert any("--model.kind=vq-ar --model.mlp_ratio=" in line for line in train)
    finetune = next(line for line in train if "openmoji_finetune" in line)
    assert re.search(r"--train.init_from=\S+/runs/base/export", finetune)
    assert "--train.init_from= " in next(line for line in train if "openmoji_scratch" in line)
    assert all(" --n 16 " in line for line in evals) and len(evals) == len(set(evals)) == 23  # N: the held-out split
    assert sum(" --seed 3 " in line for line in evals) == 21  # the two others: the sampling-noise seeds
    assert sum(line.startswith("[run, alone]") for line in evals) == 4  # claim 1: images/s is the measurement
    ar_eval = next(line for line in evals if "/vq_ar/" in line)
    assert "--steps" not in ar_eval and "--guidance 1 " in ar_eval


def test_verdicts_follow_the_noise_margins():
    from claims import CLAIMS, Comparison, overall
    from claims_report import Noise

    noise = Noise(sampling_sd=1.0, training_delta=3.0, same=3 * math.sqrt(2), between=6.0)

    def fig(label, fid, top1=0.5, ips=10.0):
        return {"label": label, "fid": fid, "top1": top1, "images_per_s": ips, "majority": 0.2}

    r = {"r0.86": fig("r = 0.86", 50.0), "r0.7": fig("r = 0.7", 60.0), "r1": fig("r = 1", 52.0)}
    got = CLAIMS[2].compare(r, noise, 200)
    assert [c.outcome for c in got] == ["for", "unclear"] and "clearly lower than r = 0.7 60.0" in got[0].text
    assert overall(got) == "Consistent with the paper where the difference is clear"
    r["r1"]["fid"] = 40.0
    assert overall(CLAIMS[2].compare(r, noise, 200)) == "Held in part"
    r["r0.7"]["fid"] = 45.0
    assert overall(CLAIMS[2].compare(r, noise, 200)) == "Did not hold"
    r = {"m0": fig("M = 0", 80.0), "m0.5": fig("M = 0.5", 75.0), "m0.9": fig("M = 0.9", 72.0), "m1": fig("M = 1", 70.0)}
    got = CLAIMS[3].compare(r, noise, 200)  # between trained models the margin is 6: 8 is clear, 3 and 2 are not
    assert [c.outcome for c in got] == ["for", "unclear", "unclear"]
    assert overall(got) == "Consistent with the paper where the difference is clear"
    assert overall([Comparison("x", "unclear"), Comparison("y", None)]) == "Inconclusive at this N"
    # top-1: 3 binomial standard errors at N (0.5 vs 0.4 at N = 200: 0.1 > 3 x 0.049 is false; at N = 2000 true)
    r = {"ft": fig("fine-tuned", 50.0, top1=0.5), "scratch": fig("scratch", 50.0, top1=0.4)}
    assert [c.outcome for c in CLAIMS[4].compare(r, noise, 200)] == ["unclear", "unclear"]
    assert [c.outcome for c in CLAIMS[4].compare(r, noise, 2000)] == ["unclear", "for"]
    # quality kept with 1/4 of the steps unless clearly worse; more T clearly better
    r = {"T100": fig("T = 100", 50.0), "T100q": fig("T = 100, 25 steps", 53.0), "T10": fig("T = 10", 70.0),
         "T10q": fig("T = 10, 3 steps", 80.0)}
    assert [c.outcome for c in CLAIMS[6].compare(r, noise, 200)] == ["for", "for", "against"]
    r = {f"d{s}": fig(f"{s} steps", 40.0, ips=100.0 / s) for s in (25, 50, 100)} | {"ar": fig("VQ-AR", 60.0, ips=2.0)}
    got = CLAIMS[1].compare(r, noise, 200)
    assert [c.outcome for c in got] == ["for"] * 3 + ["for", "unclear", "against"] + ["unclear"]
    assert "2x the images/s" in got[3].text


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_driver_trains_evaluates_and_writes_results_then_reuses_them(toy_configs, tmp_path):
    from paper_claims import main

    # claims 1, 4 and 7: the timed rows that run alone, VQ-AR, a fine-tune that waits for its base, an
    # evaluation on the second data set, class and unconditional models (the dry run plans all seven)
    args = driver_args(toy_configs, tmp_path, "--n", "8", "--seed", "1", "--steps-scale", "0.5", "--sample-steps", "5",
                       "--claims", "1", "4", "7")
    assert main(args) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert re.findall(r"## Claim (\d): ", text) == ["1", "4", "7"]
    verdicts = re.findall(r"\*\*Here \(8 images, seed 1\):\*\* (.+)", text)
    assert len(verdicts) == 3 and all(v.startswith(("Held", "Did not hold", "Consistent", "Inconclusive"))
                                      for v in verdicts), verdicts
    rows = [line for line in text.splitlines() if line.startswith("| ") and "training/evaluate.py" in line]
    assert len(rows) == 4 + 4 + 3 + 3  # noise, then claims 1, 4, 7 (a row shared by claims repeats)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        setting, form, fid, floor, n, top1, _, ips, seed, command = cells
        assert float(fid) > 0 and re.fullmatch(r"[\d.]+ \(N=8\)", floor) and n == "8" and float(ips) > 0
        assert seed in ("1", "2", "3") and f"--seed {seed} " in command and "--n 8 " in command
        assert command.startswith("`OMP_NUM_THREADS=1 python training/evaluate.py --model ")
        assert form in ("typed", "class", "none") and (top1 == "n/a") == (form == "none")
    assert "VQ-AR: 16 sequential tokens" in text and "python training/train.py" in text
    ar_row = next(r for r in rows if r.startswith("| VQ-AR"))
    assert "/vq_ar/export" in ar_row and "--steps" not in ar_row
    evals = sorted((tmp_path / "runs").glob("*/export/eval*/*.json"))
    assert len(evals) == 13 and all(json.loads(p.read_text())["n_generated"] == 8 for p in evals)
    class_eval = json.loads(next(p for p in evals if "/class/" in str(p)).read_text())
    assert set(class_eval["forms"]) == {"class"}
    # the base model on the fine-tune set and on its own: two results, neither overwriting the other
    base_on_openmoji = [p for p in evals if "/base/export/eval_openmoji/" in str(p)]
    assert len(base_on_openmoji) == 1 and (tmp_path / "runs/base/export/eval" / base_on_openmoji[0].name).is_file()

    # a second call trains and evaluates nothing; it rewrites the same tables
    stamps = {p: p.stat().st_mtime for p in evals}
    assert main(args) == 0
    assert all(p.stat().st_mtime == t for p, t in stamps.items())
    again = (tmp_path / "RESULTS.md").read_text()
    assert [line for line in again.splitlines() if line.startswith("| ")] == \
        [line for line in text.splitlines() if line.startswith("| ")]
