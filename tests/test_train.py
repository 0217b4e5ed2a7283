"""The diffusion trainer under the real launcher: DeepSpeed on 2 CPU ranks over gloo, a real MLflow store.

Multi-process tests are `slow` (they run in CI); the unit tests of the pieces are at the top.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from launch import REPO, deepspeed_cmd, launch, launcher_env
from safetensors.torch import load_file
from token_data import PATTERNS, write_token_dataset

from training.core.budget import StepBudget, plan_end
from training.core.config import OptimConfig, load_config
from training.core.distributed import DistInfo
from training.core.ema import EMA
from training.core.export import resolve_init_from
from training.core.metrics import denoiser_flops_per_sample
from training.core.optim import LRSchedule, build_optimizer, set_total_steps
from training.diffusion.config import DiffusionRunConfig, build_model_config
from training.diffusion.data import TokenDataConfig, open_dataset
from training.diffusion.monitor import validation_loader, validation_loss
from training.diffusion.objective import Denoising
from vqd.loading import load_model
from vqd.models import VQDiffusionConfig, VQDiffusionModel
from vqd.pipeline import TextToImage
from vqd.sampling import SamplingConfig, sample_captions
from vqd.text import tokenize

TRAIN = "training/train.py"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_token_dataset(tmp_path_factory.mktemp("toy"), train=200, test=40, per_shard=25)


def args(data: Path, run: Path, db: Path, *extra: str) -> list[str]:
    """A micro model on the toy set: fp32 (bit-exact comparisons), every artefact written often."""
    return ["--config", "configs/emoji_base.yaml", f"--data.path={data}", f"--train.run_dir={run}",
            f"--tracking.uri=sqlite:///{db}", "--tracking.experiment=test-train", "--model.size=micro",
            "--text.pretrained=null", "--train.micro_batch_size=16", "--train.precision=fp32", "--train.log_every=2",
            "--sample.count=4", "--sample.steps=4", "--optim.warmup_steps=5", "--train.num_workers=1", *extra]


# ---------------------------------------------------------------------------------------------- units


def test_bad_config_is_refused_naming_the_key():
    base = REPO / "configs/emoji_base.yaml"
    for override, match in [("--train.stepz=3", "train.stepz"), ("--model.condition=image", "condition"),
                            ("--data.drop_text=1.5", "data.drop_text"), ("--model.size=huge", "size"),
                            ("--optim.schedule=exp", "optim.schedule"), ("--train.precision=fp8", "train.precision"),
                            ("--data.balance=-1", "data.balance")]:
        with pytest.raises(ValueError, match=match):
            load_config(DiffusionRunConfig, base, [override])


def test_fine_tune_must_keep_the_base_architecture(toy):
    manifest = open_dataset(TokenDataConfig(path=str(toy)))
    cfg = load_config(DiffusionRunConfig, REPO / "configs/emoji_base.yaml", ["--model.size=micro"])
    base = build_model_config(cfg, manifest).to_dict()
    cfg.model.dropout, cfg.model.checkpoint = 0.1, True  # training-only fields may change
    tuned = build_model_config(cfg, manifest, base=base)
    assert tuned.dropout == 0.1 and tuned.checkpoint and tuned.depth == base["depth"]
    # the tower's weights come from the base: the same tower reached another way (a Hugging Face folder for the
    # base, the open_clip tag in the fine-tune's config) is the same architecture, and the base's source is kept
    own = dict(cfg.text)
    cfg.text = {**own, "pretrained": "/elsewhere/clip-vit-base-patch32", "seed": 3}
    assert build_model_config(cfg, manifest, base=base).text == tuned.text
    cfg.text = {**own, "width": 64}  # another tower is refused
    with pytest.raises(ValueError, match=r"differs from this config in \['text'\]"):
        build_model_config(cfg, manifest, base=base)
    cfg.text, cfg.model.depth = own, 5
    with pytest.raises(ValueError, match=r"differs from this config in \['depth'\]"):
        build_model_config(cfg, manifest, base=base)


def test_validation_loss_builds_no_autograd_graph(toy):
    cfg = load_config(DiffusionRunConfig, REPO / "configs/emoji_base.yaml",
                      ["--model.size=micro", "--text.pretrained=null", f"--data.path={toy}", "--train.num_workers=0",
                       "--train.micro_batch_size=8"])
    manifest = open_dataset(cfg.data)
    model = VQDiffusionModel(build_model_config(cfg, manifest))
    objective = Denoising(model)  # what the trainer's DeepSpeed engine wraps
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
    graphs = []

    def engine(*inputs):  # the engine's call, recording whether the forward pass builds a graph
        out = objective(*inputs)
        graphs.append(out.requires_grad)
        return out

    engine.module = objective
    out = validation_loss(engine, model, validation_loader(manifest, cfg, model, info), info, batches=2)
    assert graphs and not any(graphs) and objective.training  # no graph on held-out batches; training mode restored
    assert set(out) == {"val/vlb", "val/aux", "val/condition_gain"} and all(v > 0 for v in list(out.values())[:2])


def test_lr_schedule_warms_up_then_decays():
    f = LRSchedule(OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    g = LRSchedule(OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0), total_steps=100)
    assert g(50) == pytest.approx(0.5)


def test_time_budget_plans_the_end_the_budget_reaches():
    assert plan_end(step=10, steps=1000, budget_s=60, spent_s=20, seconds_per_step=0.5) == 90
    assert plan_end(step=10, steps=50, budget_s=60, spent_s=20, seconds_per_step=0.5) == 50  # train.steps first
    assert plan_end(step=10, steps=1000, budget_s=60, spent_s=61, seconds_per_step=0.5) == 10  # time is up


def test_time_budget_ends_the_loop_in_time_with_its_lr_decay_complete():
    """A loop of 20 ms steps under a 1.2 s budget: it plans ~60 steps, ends in time, its cosine decay done."""
    import time

    module = torch.nn.Linear(2, 2)
    optim = OptimConfig(lr=1.0, warmup_steps=5, schedule="cosine", min_lr_ratio=0.1)
    opt, sched = build_optimizer(module, optim, 10 ** 6, torch.device("cpu"))
    budget, step, lrs = StepBudget(max_minutes=0.02, steps=10 ** 6, step=0, every=5), 0, []
    started = time.perf_counter()
    while step < budget.planned:
        time.sleep(0.02)
        opt.step()
        sched.step()
        step += 1
        if budget.update(step, torch.device("cpu"), world_size=1) != sched.lr_lambdas[0].total_steps:
            set_total_steps(sched, budget.planned)
        lrs.append(sched.get_last_lr()[0])
    took = time.perf_counter() - started
    assert 1.0 < took < 1.6 and 30 < step < 62 and budget.planned == step, (took, step)
    assert lrs[-1] == pytest.approx(0.1, abs=0.01) and max(lrs) > 0.9  # warmed up, then decayed to the end
    # a checkpoint's state gives a resumed run the same plan and the time already spent; other steps re-plan
    state = {"step": step, **budget.state()}
    again = StepBudget.resumed(0.02, 10 ** 6, state, every=5)
    assert again.planned == step and again.spent() >= took - 0.05
    assert StepBudget.resumed(0.02, 500, state, every=5).planned == 500
    assert StepBudget(0, 300, 0).update(300, torch.device("cpu"), 1) == 300  # no budget: train.steps


def test_ema_tracks_the_weights_with_warm_up():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"p": p}, decay=0.9)
    expected = torch.zeros(3)
    for step in range(30):
        with torch.no_grad():
            p.fill_(float(step))
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * float(step)
        ema.update()
    assert torch.allclose(ema.full_state()["p"], expected)


def test_flops_count_matches_a_hand_count():
    # one block, width 2, 1 image token, 1 text token of width 2, mlp 1, K = 1: count every matmul by hand
    # self-attn qkv+out 4*c*c, scores+sum 2*n*c, cross q+out 2*c*c, scores+sum 2*L*c, mlp 2*r*c*c -> MACs per token
    macs_token = 4 * 4 + 2 * 1 * 2 + 2 * 4 + 2 * 1 * 2 + 2 * 1 * 4
    macs_text_kv = 2 * 1 * 2 * 2
    macs_head = 2 * 1
    assert denoiser_flops_per_sample(1, 2, 1, 1, 1, 2, 1) == 2 * (macs_token + macs_text_kv + macs_head)
    # local mixing: a 3 x 3 depthwise convolution over the r*c hidden channels of every token
    assert (denoiser_flops_per_sample(1, 2, 1, 1, 1, 2, 1, local_mixing=True)
            == 2 * (macs_token + 9 * 1 * 2 + macs_text_kv + macs_head))


# -------------------------------------------------------------------------------- multi-process (slow)


def read_run(db: Path, run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return client, client.get_run((run / "mlflow_run_id.txt").read_text().strip())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_zero2_learn_log_and_export(tmp_path, toy):
    run, db = tmp_path / "run", tmp_path / "mlflow.db"
    out = launch(TRAIN, args(toy, run, db, "--train.steps=200", "--train.save_every=100", "--train.image_every=100",
                             "--train.eval_every=25", "--deepspeed.zero_optimization.stage=2", "--optim.lr=3e-3",
                             "--train.ema_decay=0.9", "--diffusion.num_timesteps=10"), launcher="deepspeed")
    assert "done: 200 steps" in out.stdout
    client, info = read_run(db, run)
    rid = info.info.run_id
    val = [m.value for m in sorted(client.get_metric_history(rid, "val/vlb"), key=lambda m: m.step)]
    assert len(val) == 8 and val[-1] < 0.5 * val[0], val  # the held-out bound falls
    # and the captions come to matter: the null condition predicts x0 worse than the caption does
    gain = [m.value for m in sorted(client.get_metric_history(rid, "val/condition_gain"), key=lambda m: m.step)]
    assert len(gain) == 8 and gain[-1] > max(0.05, 2 * gain[0]), gain
    for name in ("loss", "vlb", "aux", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "epoch"):
        assert client.get_metric_history(rid, name), name
    assert info.data.params["deepspeed.zero_optimization.stage"] == "2" and info.data.tags["world_size"] == "2"
    assert {a.path for a in client.list_artifacts(rid, "samples")} == {"samples/step_00000100.png",
                                                                       "samples/step_00000200.png"}
    assert "export/model.safetensors" in {a.path for a in client.list_artifacts(rid, "export")}

    # the export samples on its own: model, text tower, tokenizer; and it learned the captions' patterns
    pipe = TextToImage.from_folder(run / "export")
    # with the sampling settings of the config's `sample` section (emoji_base.yaml's, steps from the command line)
    assert pipe.sampling == SamplingConfig(steps=4, truncation=0.5, guidance_scale=2.0, purity=True)
    assert "configs/emoji_base.yaml" in pipe.sampling_chosen_by["how"]
    captions = list(PATTERNS)
    tokens = sample_captions(pipe.model, captions * 8, SamplingConfig(steps=10, truncation=1.0),
                             generator=torch.Generator().manual_seed(0))
    match = [(tokens[i::len(captions)] == torch.as_tensor(PATTERNS[c]).long()).float().mean().item()
             for i, c in enumerate(captions)]
    assert min(match) > 0.5, match  # 1/8 by chance
    assert pipe.generate(captions[:2], SamplingConfig(steps=4)).shape == (2, 3, 16, 16)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, toy):
    common = ["--train.steps=40", "--train.save_every=8", "--train.image_every=0", "--train.eval_every=0",
              "--deepspeed.zero_optimization.stage=1", "--train.ema_decay=0.95",
              "--data.balance=0.5",  # the balanced stream's draws resume exactly too
              "--train.max_minutes=60"]  # and a time budget that is never reached changes nothing, resumed or not
    whole, db = tmp_path / "whole", tmp_path / "mlflow.db"
    launch(TRAIN, args(toy, whole, db, *common))

    cut, log = tmp_path / "cut", tmp_path / "cut.log"
    with open(log, "wb") as out:  # kept, so that a run that never reached its first checkpoint says why
        proc = subprocess.Popen(deepspeed_cmd(TRAIN, args(toy, cut, db, *common)), cwd=REPO, env=launcher_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not (cut / "checkpoints/step_00000008/complete").is_file() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, mid-run
    proc.wait()
    done = sorted(p.name for p in (cut / "checkpoints").glob("step_*") if (p / "complete").is_file())
    assert done and done[-1] != "step_00000040", (done, log.read_text(errors="replace")[-3000:])  # killed mid-run

    launch(TRAIN, args(toy, cut, db, *common, "--train.resume=auto"))
    a, b = weights(whole / "export"), weights(cut / "export")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # the live weights too, not only the EMA
    live = [torch.load(p / "checkpoints/step_00000040/mp_rank_00_model_states.pt", weights_only=False)["module"]
            for p in (whole, cut)]
    assert all(torch.equal(live[0][k], live[1][k]) for k in live[0])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero3_export_samples_like_zero0_and_fine_tunes_start_from_it(tmp_path, toy):
    common = ["--train.steps=10", "--train.save_every=10", "--train.image_every=0", "--train.eval_every=0",
              "--train.ema_decay=0.9"]
    db = tmp_path / "mlflow.db"
    exports = {}
    for stage in (0, 3):
        run = tmp_path / f"zero{stage}"
        launch(TRAIN, args(toy, run, db, *common, f"--deepspeed.zero_optimization.stage={stage}"))
        exports[stage] = run / "export"
    a, b = weights(exports[0]), weights(exports[3])
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].numel() for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)

    tokens = [sample_captions(load_model(exports[s]), list(PATTERNS), SamplingConfig(steps=10),
                              generator=torch.Generator().manual_seed(1)) for s in (0, 3)]
    assert (tokens[0] == tokens[1]).float().mean() > 0.95

    # a fine-tune of the ZeRO-3 export from its MLflow run, at ZeRO-2 (the demo fine-tunes from a folder)
    base = tmp_path / "zero3"
    client, base_run = read_run(db, base)
    init_from, tuned = f"runs:/{base_run.info.run_id}", tmp_path / "ft_run"
    # lr 0: the fine-tune's weights can only be the base's, so equality proves where it started
    launch(TRAIN, args(toy, tuned, db, "--train.steps=2", "--train.save_every=2", "--train.image_every=0",
                       "--train.eval_every=0", f"--train.init_from={init_from}", "--optim.lr=0.0",
                       "--train.ema_decay=0.5", "--deepspeed.zero_optimization.stage=2"))
    a, b = weights(base / "export"), weights(tuned / "export")
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, run = read_run(db, tuned)
    assert run.data.tags["mlflow.parentRunId"] == base_run.info.run_id
    assert run.data.params["train.init_from"] == init_from
    # the folder form names the same parent, through the export's provenance

    assert resolve_init_from(str(base / "export"), f"sqlite:///{db}", tmp_path) == (base / "export",
                                                                                     base_run.info.run_id)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_config_fails_before_any_rank_works(tmp_path, toy):
    run = tmp_path / "run"
    start = time.time()
    out = launch(TRAIN, args(toy, run, tmp_path / "m.db", "--train.stepz=3"), check=False, launcher="deepspeed")
    assert out.returncode != 0 and "train.stepz" in out.stdout
    out = launch(TRAIN, args(tmp_path / "no_such_data", run, tmp_path / "m.db"), check=False)
    assert out.returncode != 0 and "no_such_data" in out.stdout and "build.py" in out.stdout
    assert not run.exists() and time.time() - start < 120


def test_text_tower_trains_only_when_asked():
    model = VQDiffusionModel(VQDiffusionConfig(num_codes=8, grid=(4, 4), size="micro", num_timesteps=10))
    frozen = Denoising(model)
    assert not any(n.startswith("text_encoder") for n, p in frozen.named_parameters() if p.requires_grad)
    tuned = Denoising(model, train_text=True)
    ids = torch.randint(1, 1000, (2, 77))
    out = tuned(torch.full((2, 16), 8), torch.tensor([3, 5]), ids, torch.tensor([False, False]))
    out[:, 0].sum().backward()
    grads = [p.grad for n, p in tuned.named_parameters() if n.startswith("text_encoder.transformer")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("train_text", [False, True])
def test_the_engine_sees_the_condition_the_model_samples_with(train_text):
    """Training (a frozen tower's features, or the tower run inside the engine) and sampling
    (model.encode_text) hand the denoiser the same condition, the pooled caption row included."""
    torch.manual_seed(0)
    model = VQDiffusionModel(VQDiffusionConfig(num_codes=8, grid=(4, 4), size="micro", num_timesteps=10,
                                               pooled_condition=True)).eval()
    engine = Denoising(model, train_text=train_text).eval()
    ids = tokenize(["red heart", "a yellow bird with black wings"])
    x_t, t, keep = torch.full((2, 16), 8), torch.tensor([3, 5]), torch.tensor([False, False])
    condition = ids if train_text else model.encode_text(ids)
    expected = model.logits(x_t, t, model.encode_text(ids)).log_softmax(dim=1)
    torch.testing.assert_close(engine(x_t, t, condition, keep), expected)
    assert model.encode_text(ids).shape == (2, 78, 32)
