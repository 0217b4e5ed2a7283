"""Every benchmark the README names runs, at a tiny size on the CPU, and writes the rows its table prints with sane
values: benchmarks/{sampling,train_step,tokenizer,pipeline,encode_gpu,gpu_check}.py. They start processes (the
deepspeed launcher, Ray, fresh encoders), so they are `slow`; the GPU check's search and its time limits are also
checked on their own, fast."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from launch import REPO, launcher_env
from tiny_images import write_dataset
from token_data import write_tokenizer


def run(*args: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """A benchmark as a user runs it, from the repository root."""
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stdout[-5000:]
    return out


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------------------------------- the GPU check's parts


def test_largest_fitting_finds_the_threshold_within_its_tries():
    from gpu_check_train import largest_fitting

    for threshold in (1, 5, 37, 64, 100, 1000):
        calls = []

        def fits(b: int) -> bool:
            calls.append(b)
            return b <= threshold

        fit, fail, tried = largest_fitting(fits, start=8, bound=128, tries=12)
        assert fit == min(threshold, 128), (threshold, tried)
        assert fail == (None if threshold >= 128 else threshold + 1), (threshold, tried)
        assert tried == [(b, b <= threshold) for b in calls] and max(calls) <= 128
    # a bounded search stops at its tries with what it knows: a fitting lower bound and a failing upper one
    fit, fail, tried = largest_fitting(lambda b: b <= 37, start=8, bound=1024, tries=5)
    assert [b for b, _ in tried] == [8, 16, 32, 64, 48] and (fit, fail) == (32, 48)


def test_bad_limit_is_a_usage_error():
    out = run("benchmarks/gpu_check.py", "--device", "cpu", "--limit", "train=soon", check=False)
    assert out.returncode == 2 and out.stdout.strip().splitlines()[-1].startswith("error: --limit"), out.stdout[-2000:]
    assert "Traceback" not in out.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_check_keeps_rows_past_a_row_time_limit(tmp_path):
    # every peak row outlives a 0.3 s limit: each is recorded as failed, the worker is started again for the next
    out = run("benchmarks/gpu_check.py", "--device", "cpu", "--sections", "peak", "--set", "row_limit_s=0.3",
              "--out", str(tmp_path / "check.json"), check=False)
    assert out.returncode == 1, out.stdout[-3000:]
    result = json.loads((tmp_path / "check.json").read_text())
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["bf16 256", "bf16 512"] or [r["name"] for r in rows] == ["fp32 256", "fp32 512"]
    assert all(r["error"] == "row time limit (0.3 s)" for r in rows), rows
    assert result["sections"]["peak"]["starts"] == 2 and result["sections"]["peak"]["status"].startswith("exit status")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gpu_check_on_the_cpu(tmp_path):
    out = run("benchmarks/gpu_check.py", "--device", "cpu", "--work", str(tmp_path / "work"),
              "--out", str(tmp_path / "check.json"), timeout=1200)
    result = json.loads((tmp_path / "check.json").read_text())
    assert {n: s["status"] for n, s in result["sections"].items()} == {n: "ok" for n in
                                                                      ("peak", "train", "sample", "resume", "collectives")}
    rows = result["rows"]
    assert all(r["error"] is None and r["device"] == "CPU" and "cores" in r["cpu"] for r in rows), rows
    by = lambda section: [r for r in rows if r["section"] == section]  # noqa: E731
    assert len(by("peak")) == 2 and all(positive(r["tflops"]) for r in by("peak"))

    plan = result["plan"]
    steps = [r for r in by("train") if "fits" not in r]
    assert {(r["size"], r["checkpointing"]) for r in steps} == {(s, k) for s in plan["sizes"] for k in (False, True)}
    for r in steps:
        assert positive(r["tokens_per_s"]) and 0 < r["mfu"] < 1 and positive(r["peak_memory_gb"])
        assert r["zero_stage"] == 2 and r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * plan["grid"] ** 2)
        assert r["mfu"] == pytest.approx(r["model_tflops"] / (plan["peak_flops"] / 1e12))
    tiny, micro = (next(r for r in steps if r["size"] == s and not r["checkpointing"]) for s in plan["sizes"])
    assert tiny["parameters_trained"] > 10 * micro["parameters_trained"]
    searches = [r for r in by("train") if "fits" in r]
    assert {(r["size"], r["checkpointing"]) for r in searches} == {(s, k) for s in plan["sizes"] for k in (False, True)}
    assert all(r["fits"] == plan["search_bound"] and r["fails_at"] is None for r in searches)

    sample = {r["kind"]: r for r in by("sample")}
    assert len(by("sample")) == 8 and set(sample) == {"vq-diffusion", "vq-ar-cache", "vq-ar-nocache", "diffusers"}
    assert all(positive(r["images_per_s"]) for r in by("sample"))
    assert sample["vq-ar-cache"]["network_evals"] == plan["grid"] ** 2
    assert {r["steps"] for r in by("sample") if r["kind"] == "diffusers"} == {25, 50, 100}

    (resume,) = by("resume")
    assert resume["equal"] and resume["live_identical"] and resume["ema_identical"] and resume["max_abs_diff"] == 0
    assert 0 < resume["killed_after_step"] < resume["steps"] == plan["resume_steps"]

    assert {r["name"] for r in by("collectives")} == {"all_reduce", "all_gather"}
    assert all(r["correct"] and r["backend"] == "gloo" and r["ranks"] == 2 for r in by("collectives"))

    assert [g["target"] for g in result["goals"]] == [0.40, 15.7, 1.0]
    assert all(g["measured"] is not None and g["met"] in (True, False) for g in result["goals"])
    assert "host CPU" in out.stdout and "| goal | measured | met |" in out.stdout


# ---------------------------------------------------------------------------------------------- the README's others


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sampling_benchmark(tmp_path):
    run("benchmarks/sampling.py", "--grid", "4", "--num-codes", "16", "--batch", "2", "--steps", "4", "2",
        "--breakdown-repeats", "1", "--threads", "1", "--out", str(tmp_path / "sampling.json"))
    result = json.loads((tmp_path / "sampling.json").read_text())
    names = [r["sampler"] for r in result["rows"]]
    assert len(names) == 6 and any("KV cache" in n for n in names) and any("diffusers" in n for n in names), names
    assert all(positive(r["images_per_s"]) and positive(r["seconds"]) for r in result["rows"])
    assert [r["network_evals"] for r in result["rows"]][:4] == [4, 2, 16, 16]
    p = result["parameters"]  # the equal-size comparison the README reads
    assert abs(p["vq_ar_transformer"] / p["vq_diffusion_denoiser"] - 1) < 0.05 and p["diffusers_transformer"] > 0
    assert all(positive(v) for v in result["step_breakdown"].values())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_training_benchmark_and_its_failure(tmp_path):
    common = ["benchmarks/train_step.py", "--worlds", "1", "--precisions", "fp32", "--batch", "4", "--steps", "2",
              "--warmup", "1", "--override=--model.size=micro"]
    run(*common, "--zero", "2", "--out", str(tmp_path / "training.json"))
    (row,) = json.loads((tmp_path / "training.json").read_text())["rows"]
    assert row["zero"] == 2 and positive(row["tokens_per_s"]) and 0 < row["mfu"] < 1
    assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 64)  # emoji_base's 8 x 8 tokens
    assert positive(row["optimizer_state_mb_per_rank"][0]) and positive(row["peak_memory_mb_per_rank"][0])
    # a configuration that fails in its rank fails the benchmark, loudly, instead of printing an empty table
    out = run(*common, "--zero", "7", "--out", str(tmp_path / "failed.json"), check=False)
    assert out.returncode == 1 and "error: 1 of 1 configurations failed (fp32 ZeRO-7 world 1)" in out.stdout, \
        out.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tokenizer_benchmark(tmp_path):
    write_dataset(tmp_path / "images", n_tars=1, per_tar=24, size=16)  # 10 held out, 14 for the FID floor
    write_tokenizer(tmp_path / "run" / "export")
    run("benchmarks/tokenizer.py", "--tokenizer", str(tmp_path / "run" / "export"), "--data",
        str(tmp_path / "images"), "--holdout", "0.3", "--batch-size", "8", "--threads", "1", "--out", str(tmp_path))
    r = json.loads((tmp_path / "tokenizer_run_heldout.json").read_text())
    assert r["images"] == 10 and r["grid"] == [4, 4] and 0 < r["codes_used"] <= r["num_codes"] == 8
    assert math.isfinite(r["psnr_mean_db"]) and r["psnr_p05_db"] <= r["psnr_median_db"]
    assert 1 <= r["perplexity"] <= 8 and positive(r["encode_images_per_s"]) and positive(r["decode_images_per_s"])
    assert r["fid"] is not None and r["fid"] >= 0 and r["fid_real_vs_real"] is not None
    assert (tmp_path / "tokenizer_run_heldout_grid.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_pipeline_benchmark(tmp_path):
    # the README's scale run (its encode actor is the encode stage's ShardEncoder, which encode_gpu.py runs below)
    run("benchmarks/pipeline.py", "--rows", "3000", "--num-cpus", "1", "--out", str(tmp_path / "pipeline.json"))
    (scale,) = json.loads((tmp_path / "pipeline.json").read_text())["scale"]["runs"]
    assert scale["rows"] == 3000 and 0 < scale["kept"] < 3000 and scale["kept"] + sum(scale["dropped"].values()) == 3000
    assert positive(scale["metadata_rows_per_s"]) and positive(scale["filter_rows_per_s"])
    assert positive(scale["driver_peak_rss_mb"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_encode_gpu_benchmark_on_the_cpu(tmp_path):
    run("benchmarks/encode_gpu.py", "--device", "cpu", "--sizes", "2", "--agree", "2", "--batch-size", "2",
        "--out", str(tmp_path / "encode.json"))
    result = json.loads((tmp_path / "encode.json").read_text())
    (r,) = result["runs"]
    assert result["device"] == "CPU" and "cores" in result["cpu"]
    assert r["samples"] == 2 and r["failed"] == {} and positive(r["images_per_s"]) and r["peak_gpu_mb"] is None
    assert r["ids_equal_to_cpu_fp32"] >= 0.99  # the same encoder on the same device: the same ids
