"""The VQ-AR baseline through the project's programs: `model.kind: vq-ar` in training/train.py (same data, optimizer,
EMA, checkpoints and export as VQ-Diffusion), its export sampling through vqd.pipeline.TextToImage, and
training/evaluate.py on it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import REPO, launcher_env
from token_data import PATTERNS, K, write_token_dataset, write_tokenizer

from training.core.config import load_config
from training.diffusion.ar_objective import NextToken, ar_micro_step
from training.diffusion.config import DiffusionRunConfig, build_model_config
from training.evaluate import main as evaluate_main
from vqd.ar import VQARConfig, VQARModel
from vqd.models import VQDiffusionModel
from vqd.network import count_parameters
from vqd.pipeline import TextToImage
from vqd.sampling import SamplingConfig

pytestmark = pytest.mark.filterwarnings("ignore:model.size")


def ar_config(*overrides: str):
    return load_config(DiffusionRunConfig, REPO / "configs/emoji_base.yaml",
                       ["--model.kind=vq-ar", "--text.pretrained=null", *overrides])


MANIFEST = {"tokenizer": {"num_codes": K, "grid": [4, 4]}}


def test_vq_ar_config_builds_the_equal_size_baseline():
    ar_cfg = build_model_config(ar_config("--model.size=VQ-AR-tiny"), MANIFEST)
    assert isinstance(ar_cfg, VQARConfig) and ar_cfg.mlp_ratio == 6.75 and ar_cfg.num_codes == K
    # VQ-AR-tiny is tiny's equal; the recipe's pooled condition and grid convolutions add weights VQ-AR has no
    # place for
    diffusion_cfg = build_model_config(ar_config("--model.kind=vq-diffusion", "--model.pooled_condition=false",
                                                 "--model.local_mixing=false"), MANIFEST)
    with torch.device("meta"):
        ar, diffusion = VQARModel(ar_cfg, load_text_weights=False), VQDiffusionModel(diffusion_cfg, load_text_weights=False)
    n_ar = count_parameters(ar) - count_parameters(ar.text_encoder)
    n_diffusion = count_parameters(diffusion) - count_parameters(diffusion.text_encoder)
    assert abs(n_ar / n_diffusion - 1) < 0.02, (n_ar, n_diffusion)  # Table 3 compares equal sizes
    # VQ-AR has no AdaLN, and a convolution would show it later tokens: both stay with VQ-Diffusion
    pooled = ar_config("--model.size=VQ-AR-tiny", "--model.pooled_condition=true", "--model.local_mixing=true")
    assert build_model_config(pooled, MANIFEST) == ar_cfg
    assert build_model_config(ar_config("--model.kind=vq-diffusion", "--model.pooled_condition=true"),
                              MANIFEST).pooled_condition

    with pytest.raises(ValueError, match="model.kind"):
        ar_config("--model.kind=gpt")
    with pytest.raises(ValueError, match="text-conditional"):
        ar_config("--model.condition=class")
    with pytest.warns(UserWarning, match="'VQ-AR-tiny' is its equal"):
        ar_config("--model.size=tiny")
    with pytest.raises(ValueError, match="base model is a 'vq-diffusion' model"):  # no fine-tune across kinds
        build_model_config(ar_config("--model.size=VQ-AR-tiny"), MANIFEST, base=diffusion_cfg.to_dict())


def test_next_token_step_is_the_cross_entropy_and_exports_by_name():
    torch.manual_seed(0)
    model = VQARModel(VQARConfig(num_codes=K, grid=(4, 4), size="micro"))
    frozen = NextToken(model)
    batch = {"vq": torch.randint(0, K, (3, 16)), "clip": torch.randint(1, 1000, (3, 77))}
    loss, vlb, t, metrics = ar_micro_step(_Engine(frozen), model, batch, torch.device("cpu"))
    logits = model.logits(batch["vq"], model.encode_text(batch["clip"]))
    by_hand = -logits.log_softmax(dim=1).gather(1, batch["vq"][:, None]).mean()  # nats per token
    torch.testing.assert_close(loss, by_hand)
    assert vlb is None and t is None
    assert metrics["nll"] == pytest.approx(float(by_hand.detach()))
    # what the engine trains is named as in the model folder (the export replaces those tensors)
    trained = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trained and trained <= set(model.state_dict()) and not any(n.startswith("text_encoder") for n in trained)
    tuned = NextToken(model, train_text=True)
    ar_micro_step(_Engine(tuned), model, batch, torch.device("cpu"))[0].backward()
    grads = [p.grad for n, p in tuned.named_parameters() if n.startswith("text_encoder.transformer")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


class _Engine:
    """What a DeepSpeed engine offers a micro-step: calling the module, and `.module`."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args):
        return self.module(*args)


def ar_folder(path: Path) -> Path:
    torch.manual_seed(0)
    VQARModel(VQARConfig(num_codes=K, grid=(4, 4), size="micro")).save(path)
    write_tokenizer(path / "tokenizer")
    return path


def test_text_to_image_samples_a_vq_ar_folder_with_top_r(tmp_path):
    pipe = TextToImage.from_folder(ar_folder(tmp_path / "ar"))
    assert pipe.autoregressive and pipe.num_timesteps is None
    captions = ["red stripes", "green border", "blue checkerboard"]
    images = pipe.generate(captions, SamplingConfig(truncation=0.7), batch_size=2,
                           generator=torch.Generator().manual_seed(3))
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    # the same draws as the model's own KV-cached generation at temperature 1, top-r 0.7, batch by batch
    g = torch.Generator().manual_seed(3)
    want = torch.cat([pipe.model.generate(pipe.model.encode_prompts(captions[i:i + 2]), g, top_r=0.7)
                      for i in (0, 2)])
    torch.testing.assert_close(images, pipe.decode(want))
    for bad in (SamplingConfig(guidance_scale=3.0), SamplingConfig(purity=True)):
        with pytest.raises(ValueError, match="do not apply"):
            pipe.generate(captions, bad)
    with pytest.raises(ValueError, match="inpainting needs a VQ-Diffusion model"):
        pipe.inpaint(captions, torch.zeros(3, 16, 16), torch.ones(16, 16, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_vq_ar_learns_the_toy_set_and_its_export_evaluates(tmp_path):
    data = write_token_dataset(tmp_path / "toy", train=200, test=40, per_shard=25, images=True)
    run = tmp_path / "run"
    cmd = [sys.executable, "training/train.py", "--config", "configs/emoji_base.yaml", f"--data.path={data}",
           f"--train.run_dir={run}", "--tracking.enabled=false", "--model.kind=vq-ar", "--model.size=micro",
           "--text.pretrained=null", "--train.steps=240", "--train.micro_batch_size=16", "--train.precision=fp32",
           "--train.num_workers=0", "--train.save_every=120", "--train.image_every=0", "--train.eval_every=40",
           "--optim.lr=3e-3", "--optim.warmup_steps=5", "--train.ema_decay=0.9", "--train.log_every=10"]
    out = subprocess.run(cmd, cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=500)
    assert out.returncode == 0 and "done: 240 steps" in out.stdout, out.stdout[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/nll"] for r in rows if "val/nll" in r]
    # held-out nats per token: ln K = 2.08 for a uniform guess; the 5% token noise alone costs 0.27
    assert len(val) == 6 and val[-1] < min(val[0], 0.45), val
    assert rows[0]["nll"] > 1.5  # it started near the uniform guess
    assert all("nll" in r and "grad_norm" in r for r in rows if "loss" in r)
    assert (run / "checkpoints/step_00000240/complete").is_file() and (run / "checkpoints/step_00000240/ema.safetensors").is_file()

    pipe = TextToImage.from_folder(run / "export")  # the export: VQARModel folder + tokenizer/
    assert pipe.autoregressive and json.loads((run / "export/provenance.json").read_text())["weights"] == "ema"
    captions = list(PATTERNS)
    tokens = pipe.model.sample_captions(captions * 8, top_r=1.0, generator=torch.Generator().manual_seed(0))
    match = [(tokens[i::len(captions)] == torch.as_tensor(PATTERNS[c]).long()).float().mean().item()
             for i, c in enumerate(captions)]
    assert min(match) > 0.5, match  # 1/8 by chance: it draws the caption's pattern

    args = ["--model", str(run / "export"), "--data", str(data), "--n", "8", "--steps", "10", "--grid", "0",
            "--no-progress", "--truncation", "0.9"]
    assert evaluate_main(args) == 0
    result = json.loads((run / "export/eval/test_n8_ar_r0.9_g1_seed0.json").read_text())
    assert result["model_kind"] == "vq-ar" and result["sampling"]["steps"] is None
    assert "--steps 10 does not apply" in result["sampling"]["note"]
    for form in ("template", "typed"):
        f = result["forms"][form]
        assert f["n_generated"] == 8 and f["fid"] > 0 and f["images_per_s"] > 0
        assert set(f["top1"]) == {"category", "subcategory"}
    with pytest.raises(ValueError, match="no null condition"):  # refused, naming why
        evaluate_main(args + ["--guidance", "3"])
