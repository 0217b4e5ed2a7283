"""training.core.config: base inheritance, typed overrides, unknown keys, wrong types, derived deepspeed section."""

from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from training.core.config import (
    OptimConfig,
    TrackingConfig,
    TrainConfig,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
    split_cli,
)
from training.core.optim import build_optimizer
from vqd.vqvae import VQVAEConfig


@dataclass
class DemoConfig:
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def files(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", {"model": {"image_size": 64, "num_embeddings": 1024},
                                   "optim": {"lr": 1.0e-3, "betas": [0.5, 0.9]},
                                   "train": {"steps": 100, "micro_batch_size": 8},
                                   "deepspeed": {"zero_optimization": {"stage": 2, "overlap_comm": True}}})
    child = write(tmp_path / "sub" / "child.yaml", {"base": "../base.yaml", "model": {"num_embeddings": 2048},
                                                    "train": {"precision": "bf16"},
                                                    "deepspeed": {"zero_optimization": {"stage": 1}}})
    return tmp_path, child


def test_base_inheritance_deep_merges(files):
    _, child = files
    cfg = load_config(DemoConfig, child)
    assert cfg.model.image_size == 64 and cfg.model.num_embeddings == 2048  # base kept, child wins
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.5, 0.9)
    assert cfg.train.steps == 100 and cfg.train.precision == "bf16"
    assert cfg.deepspeed["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert cfg.model.ch == VQVAEConfig().ch  # untouched keys keep their defaults


def test_overrides_are_parsed_to_field_types(files):
    _, child = files
    cfg = load_config(DemoConfig, child, ["--optim.lr=3e-4", "--train.steps", "7", "--model.ch_mult=[1,2,2,4]",
                                          "--model.image_size=32", "--train.compile=true", "--tracking.run_name=abc",
                                          "--optim.betas=[0.9, 0.96]", "--deepspeed.zero_optimization.stage=3"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.model.ch_mult == (1, 2, 2, 4) and cfg.train.compile is True
    assert cfg.tracking.run_name == "abc" and cfg.optim.betas == (0.9, 0.96)
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("override,match", [
    ("--train.stepz=3", "train.*stepz"),
    ("--trian.steps=3", "unknown section 'trian'"),
])
def test_unknown_override_key_is_an_error_naming_it(files, override, match):
    _, child = files
    with pytest.raises(ValueError, match=match):
        load_config(DemoConfig, child, [override])


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    path = write(tmp_path / "x.yaml", {"optim": {"learning_rate": 1.0}})
    with pytest.raises(ValueError, match=r"optim\.learning_rate"):
        load_config(DemoConfig, path)
    path = write(tmp_path / "y.yaml", {"optimiser": {}})
    with pytest.raises(ValueError, match="optimiser"):
        load_config(DemoConfig, path)


@pytest.mark.parametrize("data,match", [
    ({"train": {"steps": "ten"}}, r"train\.steps: expected int"),
    ({"train": {"steps": 1.5}}, r"train\.steps: expected int"),
    ({"optim": {"lr": "fast"}}, r"optim\.lr: expected float"),
    ({"train": {"compile": "yes"}}, r"train\.compile: expected bool"),
    ({"optim": {"betas": [0.9]}}, r"optim\.betas: expected 2 items"),
    ({"model": {"ch_mult": [1, "two"]}}, r"model\.ch_mult\[1\]: expected int"),
])
def test_wrong_type_is_an_error_naming_the_key(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        load_config(DemoConfig, write(tmp_path / "bad.yaml", data))


def test_wrong_type_override_is_an_error(files):
    _, child = files
    with pytest.raises(ValueError, match=r"train\.steps: expected int"):
        load_config(DemoConfig, child, ["--train.steps=many"])
    with pytest.raises(ValueError, match=r"train\.compile: expected a bool"):
        load_config(DemoConfig, child, ["--train.compile=maybe"])


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("optim:\n  lr: 1e-4\n")  # PyYAML reads this as a string
    assert load_config(DemoConfig, path).optim.lr == 1e-4


def test_deepspeed_section_is_derived_from_train(files):
    _, child = files
    cfg = load_config(DemoConfig, child, ["--train.grad_accum=4", "--train.grad_clip=0.5"])
    ds = cfg.deepspeed
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}


def test_deepspeed_keys_owned_by_train_are_refused(tmp_path):
    path = write(tmp_path / "x.yaml", {"deepspeed": {"train_micro_batch_size_per_gpu": 4}})
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu.*derived from the train section"):
        load_config(DemoConfig, path)
    with pytest.raises(ValueError, match="train.precision"):
        load_config(DemoConfig, write(tmp_path / "p.yaml", {"train": {"precision": "fp8"}}))


def test_model_validation_names_image_size_and_factor(tmp_path):
    path = write(tmp_path / "x.yaml", {"model": {"image_size": 36, "ch_mult": [1, 2, 2, 2]}})
    with pytest.raises(ValueError, match=r"model: image_size 36 is not divisible by the downsampling factor 8"):
        load_config(DemoConfig, path)


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ValueError, match="cycle"):
        load_config(DemoConfig, tmp_path / "a.yaml")
    with pytest.raises(ValueError, match="does not exist"):
        load_config(DemoConfig, tmp_path / "nope.yaml")


def test_resolved_config_round_trips(files, tmp_path):
    _, child = files
    cfg = load_config(DemoConfig, child, ["--train.steps=9"])
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert saved.read_text().startswith("# deepspeed, derived from train:")
    again = load_config(DemoConfig, saved)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert load_config(DemoConfig, saved, ["--train.grad_accum=2"]).deepspeed["gradient_accumulation_steps"] == 2


def test_cli_split_drops_launcher_local_rank():
    path, rest = split_cli(["--local_rank=1", "--config", "c.yaml", "--train.steps=3"])
    assert path == "c.yaml" and rest == ["--train.steps=3"]
    assert parse_overrides(["--a.b=1", "--c.d", "x y"]) == {"a.b": "1", "c.d": "x y"}
    with pytest.raises(ValueError, match="--section.key=value"):
        parse_overrides(["steps=3"])
    with pytest.raises(ValueError, match="missing --config"):
        split_cli(["--train.steps=3"])


def test_auto_precision_never_picks_emulated_bf16():
    """With PyTorch's kernels held to AVX2 (as on CPUs without AVX-512), bf16 matmuls are emulated, ~60x slower
    than fp32: `auto` must pick fp32 there, whatever the hardware flags say."""
    import subprocess
    import sys

    code = "from training.core.config import resolve_precision; print(resolve_precision('auto'), resolve_precision('bf16'))"
    env = {**__import__("os").environ, "ATEN_CPU_CAPABILITY": "avx2", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fp32", "bf16"]  # an explicit choice is kept


def test_adamw_is_fused_on_cpu_and_steps_as_the_written_out_update():
    """build_optimizer's fused kernel, one AdamW step with decay, against the update written out by hand."""
    import torch


    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    w0, grad = layer.weight.detach().clone(), torch.randn(4, 8)
    optim = OptimConfig(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=0, schedule="constant")
    opt, _ = build_optimizer(layer, optim, total_steps=10, device=torch.device("cpu"))
    assert opt.defaults["fused"] is True
    layer.weight.grad, layer.bias.grad = grad.clone(), torch.zeros(4)
    opt.step()
    m, v = (1 - 0.9) * grad, (1 - 0.95) * grad ** 2
    m_hat, v_hat = m / (1 - 0.9), v / (1 - 0.95)
    want = w0 * (1 - 1e-2 * 0.1) - 1e-2 * m_hat / (v_hat.sqrt() + optim.eps)
    assert torch.allclose(layer.weight.detach(), want, atol=1e-6)
