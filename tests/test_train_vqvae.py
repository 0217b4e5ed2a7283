"""Tokenizer training: robust image loading, and (slow) DeepSpeed on 2 CPU ranks with MLflow, resume, export."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import launch
from PIL import Image
from tiny_images import png_bytes, truncated_tar, write_dataset, write_tar

from training.core.checkpoint import rng_state, set_rng_state
from training.core.config import load_config
from training.core.distributed import read_env
from training.tokenizer.config import LossConfig, VQVAERunConfig
from training.tokenizer.data import ImageDataConfig, ImageStream, image_loader, load_image
from training.tokenizer.objective import TokenizerObjective
from training.tracking.redaction import redact_params
from vqd.autoencoder import hinge_d_loss
from vqd.vqvae import VQVAE, VQVAEConfig, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def collect(source, size=32, split="all", **kw):
    """Every image of one pass (batch 1) and the summed skip counts."""
    cfg = ImageDataConfig(source=str(source), holdout=kw.pop("holdout", 0.0), shuffle_buffer=0)
    stream = ImageStream(cfg, size, batch_size=1, split=split, epochs=1, drop_last=False, **kw)
    xs, counts = [], {}
    for x, c in stream:
        xs.append(x[0])
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
    assert all(counts[k] <= v for k, v in stream.totals.items() if k in counts)  # per-batch deltas add up
    return xs, dict(stream.totals)


def rgba_png(size=8) -> bytes:
    arr = np.zeros((size, size, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red everywhere, but ...
    arr[: size // 2, :, 3] = 255  # ... only the top half is opaque; the bottom half is fully transparent
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_and_tars_are_skipped_and_counted(tmp_path):
    good = png_bytes(24, seed=1)
    write_tar(tmp_path / "train-000000.tar", {
        "a_good": good,
        "b_truncated": good[: len(good) // 2],
        "c_not_an_image": b"<html>404 not found</html>",
        "d_alpha": rgba_png(),
        "e_tiny": png_bytes(4, seed=2),
        "f_empty": b"",
    })
    (tmp_path / "train-000001.tar").write_bytes(b"this is not a tar file at all" * 40)
    truncated_tar(tmp_path / "train-000002.tar", {f"g{i}": png_bytes(64, seed=i) for i in range(3)}, cut=100)
    xs, counts = collect(tmp_path)
    assert len(xs) == 3  # good, alpha, tiny
    assert counts == {"bad_images": 3, "bad_tars": 2}
    assert all(x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1 for x in xs)


def test_alpha_is_composited_on_white_and_tiny_images_are_upscaled():
    x = load_image(rgba_png(8), size=8)
    assert torch.allclose(x[:, 6:, :], torch.ones(3, 2, 8))  # transparent -> white
    assert torch.allclose(x[:, :2, :], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 2, 8))  # red
    assert load_image(png_bytes(4), size=32).shape == (3, 32, 32)
    wide = Image.new("RGB", (60, 20), (0, 0, 255))
    buf = io.BytesIO()
    wide.save(buf, format="JPEG")
    assert load_image(buf.getvalue(), size=16).shape == (3, 16, 16)  # shorter side resized, centre crop
    palette = Image.new("P", (6, 6), 0)
    palette.info["transparency"] = 0
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)
    assert torch.allclose(load_image(buf.getvalue(), size=6), torch.ones(3, 6, 6))


def test_image_folder_source_with_a_broken_file(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(20, seed=i))
    (tmp_path / "broken.png").write_bytes(png_bytes(20)[:40])
    xs, counts = collect(tmp_path, size=16)
    assert len(xs) == 5 and counts == {"bad_images": 1}


def test_several_sources_are_read_as_one(tmp_path):
    write_dataset(tmp_path / "a", n_tars=2, per_tar=5, size=8)
    write_dataset(tmp_path / "b", n_tars=1, per_tar=7, size=8)
    both, _ = collect(f"{tmp_path / 'a'}, {tmp_path / 'b'}/*.tar", size=8)
    assert len(both) == len(collect(tmp_path / "a", size=8)[0]) + 7 == 17
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "0.png").write_bytes(png_bytes(8))
    with pytest.raises(ValueError, match="mixes tars and image folders"):
        collect(f"{tmp_path / 'a'},{tmp_path / 'c'}")


def test_holdout_split_is_disjoint_and_complete(tmp_path):
    write_dataset(tmp_path, n_tars=2, per_tar=40, size=8)
    everything, _ = collect(tmp_path, size=8)
    train, _ = collect(tmp_path, size=8, split="train", holdout=0.25)
    held, _ = collect(tmp_path, size=8, split="heldout", holdout=0.25)
    assert len(train) + len(held) == len(everything) == 80 and 5 <= len(held) <= 40
    keys = lambda xs: {tuple(x.flatten()[:12].tolist()) for x in xs}  # noqa: E731
    assert not keys(train) & keys(held)


def test_split_from_sample_json_decides_held_out(tmp_path):
    keys = [f"{i:04d}" for i in range(12)]
    splits = {k: ("test" if i % 4 == 0 else "train") for i, k in enumerate(keys)}
    write_tar(tmp_path / "train-000000.tar", {k: png_bytes(8, seed=i) for i, k in enumerate(keys)}, splits=splits)
    held, _ = collect(tmp_path, size=8, split="heldout", holdout=0.9)  # the hash fraction is not used
    train, _ = collect(tmp_path, size=8, split="train", holdout=0.9)
    assert len(held) == 3 and len(train) == 9
    expected = load_image(png_bytes(8, seed=4), size=8)
    assert any(torch.equal(x, expected) for x in held)


def test_ranks_get_disjoint_shards_and_skip_resumes_the_stream(tmp_path):
    write_dataset(tmp_path, n_tars=1, per_tar=30, size=8)
    cfg = ImageDataConfig(source=str(tmp_path), holdout=0.0, shuffle_buffer=0)
    full = [x for x, _ in ImageStream(cfg, 8, 3, split="all", epochs=1)]
    resumed = [x for x, _ in ImageStream(cfg, 8, 3, split="all", epochs=1, skip_batches=4)]
    assert len(full) == 10 and len(resumed) == 6
    assert all(torch.equal(a, b) for a, b in zip(full[4:], resumed))
    r0, _ = collect(tmp_path, size=8, rank=0, world_size=2)
    r1, _ = collect(tmp_path, size=8, rank=1, world_size=2)
    assert len(r0) == len(r1) == 15
    assert torch.allclose(torch.stack(r0 + r1).sum(0), torch.stack(full).flatten(0, 1).sum(0), atol=1e-4)
    assert not any(torch.equal(a, b) for a in r0 for b in r1)  # blocky random images are all distinct


def test_resume_with_loader_workers_continues_the_round_robin(tmp_path):
    write_dataset(tmp_path, n_tars=4, per_tar=12, size=8)
    cfg = ImageDataConfig(source=str(tmp_path), holdout=0.0, shuffle_buffer=4)
    full = [x for _, (x, _) in zip(range(14), image_loader(cfg, 8, 3, num_workers=2, seed=1))]
    resumed = [x for _, (x, _) in zip(range(9), image_loader(cfg, 8, 3, num_workers=2, seed=1, skip_batches=5))]
    assert all(torch.equal(a, b) for a, b in zip(full[5:], resumed))


def test_config_rejects_bad_tokenizer_settings(tmp_path):
    with pytest.raises(ValueError, match="image_size 30 is not divisible by the downsampling factor 8"):
        load_config(VQVAERunConfig, REPO / "configs/vqvae_emoji.yaml", ["--model.image_size=30"])
    with pytest.raises(ValueError, match="gumbel"):
        load_config(VQVAERunConfig, REPO / "configs/vqvae_emoji.yaml", ["--model.codebook=gumbel"])
    with pytest.raises(ValueError, match=r"norm_groups 16 leaves one channel a group at \[16\] channels.*at most 8"):
        load_config(VQVAERunConfig, REPO / "configs/vqvae_emoji.yaml", ["--model.norm_groups=16"])
    cfg = load_config(VQVAERunConfig, REPO / "configs/vqvae_f8_8192.yaml")
    assert cfg.model.num_embeddings == 8192 and cfg.model.downsample_factor == 8
    assert cfg.deepspeed["bf16"]["enabled"] and cfg.deepspeed["train_micro_batch_size_per_gpu"] == 12


def _launch(args, tmp_path, launcher="ranks"):
    return launch("training/train_vqvae.py", args, launcher=launcher).stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_deepspeed_two_cpu_ranks_train_resume_export(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, n_tars=2, per_tar=24, size=16)
    (data / "train-000002.tar").write_bytes(b"corrupt" * 100)  # skipped and counted, never a crash
    run, db = tmp_path / "run", tmp_path / "mlflow.db"
    common = ["--config", "configs/vqvae_emoji.yaml", f"--data.source={data}", "--data.holdout=0.2",
              "--data.shuffle_buffer=8", "--model.image_size=16", "--model.ch_mult=[1,2]", "--model.ch=32",
              "--model.num_embeddings=32", "--model.embed_dim=8", "--train.micro_batch_size=4",
              "--train.save_every=2", "--train.log_every=1", "--train.image_every=2", "--train.eval_every=0",
              "--train.num_workers=0", "--optim.warmup_steps=0", "--optim.schedule=constant",
              f"--tracking.uri=sqlite:///{db}", "--tracking.experiment=test-vqvae"]
    _launch(common + [f"--train.run_dir={run}", "--train.steps=4", "--prune.enabled=false"], tmp_path,
            launcher="deepspeed")
    first_id = (run / "mlflow_run_id.txt").read_text()
    assert (run / "checkpoints/step_00000004/rank_1.pt").is_file()
    log = _launch(common + [f"--train.run_dir={run}", "--train.steps=6", "--train.resume=auto", "--prune.enabled=true"],
                  tmp_path)
    assert "final:" in log

    # the run continued: same MLflow run, one loss value per step 1..6, a checkpoint at 6, old ones pruned
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000004", "step_00000006"]
    state = torch.load(run / "checkpoints/step_00000006/rank_0.pt", weights_only=True)
    assert state["step"] == 6 and state["batches"] == 6
    assert (run / "mlflow_run_id.txt").read_text() == first_id
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    steps = sorted(m.step for m in client.get_metric_history(first_id, "loss"))
    assert steps == [1, 2, 3, 4, 5, 6]
    for name in ("psnr", "usage", "perplexity", "images_per_s", "heldout/psnr", "skipped/bad_tars"):
        assert client.get_metric_history(first_id, name), name
    assert client.get_metric_history(first_id, "skipped/bad_tars")[-1].value >= 1
    run_info = client.get_run(first_id)
    assert run_info.data.params["model.image_size"] == "16" and run_info.info.status == "FINISHED"
    artifacts = [a.path for a in client.list_artifacts(first_id, "reconstructions")]
    assert any(a.endswith("step_00000006.png") for a in artifacts)

    # the export folder is a tokenizer folder, pruned to the used codes

    tok = load_tokenizer(run / "export")
    assert tok.grid == (8, 8) and 1 <= tok.num_codes <= 32 and tok.config["used_codes"] == tok.num_codes
    ids = tok.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert ids.shape == (2, 64) and int(ids.max()) < tok.num_codes

    # nothing was skipped, repeated or lost: the resumed run ends where an uninterrupted one does
    whole = tmp_path / "whole"
    _launch(common + [f"--train.run_dir={whole}", "--train.steps=6", "--prune.enabled=true"], tmp_path)
    from safetensors.torch import load_file

    a, b = load_file(str(whole / "export/model.safetensors")), load_file(str(run / "export/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# ---- GAN objective, tracking, checkpoint RNG, launcher environments ----

def test_gan_term_switches_on_at_disc_start_with_adaptive_weight():
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(image_size=16, ch=32, ch_mult=(1, 2), z_channels=8, embed_dim=4, num_embeddings=16,
                           restart_after=0))
    obj = TokenizerObjective(vq, LossConfig(disc_weight=0.5, disc_start=3, disc_layers=2, disc_width=8)).train()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    loss, metrics = obj(x, step=2)
    assert "g_loss" not in metrics
    assert torch.allclose(loss, metrics["rec_l1"] + metrics["q_loss"])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in obj.disc.parameters())

    obj.zero_grad()
    vq.quantize.eval()  # freeze codebook updates so that the two passes below see the same model
    torch.manual_seed(1)
    loss, m = obj(x, step=3)
    # independent recomputation of the VQGAN adaptive weight and of the total
    rec, q_loss, _, _ = vq(x)
    l1 = (x - rec).abs().mean()
    g = -obj.disc(rec).mean()
    last = vq.decoder.conv_out.weight
    gr, gg = torch.autograd.grad(l1, last, retain_graph=True)[0], torch.autograd.grad(g, last, retain_graph=True)[0]
    weight = 0.5 * gr.norm() / (gg.norm() + 1e-4)
    assert torch.allclose(m["disc_weight"], weight, rtol=1e-4)
    assert torch.allclose(loss, l1 + q_loss + weight * g + hinge_d_loss(obj.disc(x), obj.disc(rec.detach())), rtol=1e-4)
    # the discriminator learns only from its own hinge loss (the generator term goes through detached weights)
    loss.backward()
    d_only = torch.autograd.grad(hinge_d_loss(obj.disc(x), obj.disc(rec.detach())), list(obj.disc.parameters()))
    for p, gd in zip(obj.disc.parameters(), d_only):
        assert torch.allclose(p.grad, gd, atol=1e-6)


def test_rng_state_round_trip(tmp_path):
    import random


    torch.manual_seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "r.pt")
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True))
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.mark.parametrize("env,expected", [
    ({}, (0, 1, 0, 1)),
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, (5, 8, 1, 4)),
    ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8(x2)"},
     (9, 16, 1, 8)),
])
def test_distributed_env_is_read_from_any_launcher(monkeypatch, env, expected):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert read_env() == expected


def test_params_are_redacted_before_they_reach_mlflow():
    params = {"tracking.uri": "postgresql://bob:hunter2@db:5432/mlflow", "data.path": "s3://b/x?X-Amz-Signature=abc&n=1",
              "deepspeed.api_key": "zzz", "store.access_token": "t", "db.password": "p", "data.tokenizer": "runs/tok",
              "data.label_key": "subcategory", "train.steps": 3, "tracking.token": ""}
    out = redact_params(params)
    assert out["tracking.uri"] == "postgresql://bob:***@db:5432/mlflow"
    assert out["data.path"] == "s3://b/x?X-Amz-Signature=***&n=1"
    assert out["deepspeed.api_key"] == out["store.access_token"] == out["db.password"] == "***"
    assert "hunter2" not in str(out) and "zzz" not in str(out)
    # names that merely contain the words stay readable
    assert out["data.tokenizer"] == "runs/tok" and out["data.label_key"] == "subcategory" and out["train.steps"] == 3
