"""One YAML per run, typed: the config system shared by every training program.

A run config is a dataclass whose fields are sections (model, data, optim, train, deepspeed, tracking, and
whatever a program adds, e.g. diffusion); each section is a dataclass of typed fields (the `deepspeed`
section is a plain dict: it is the DeepSpeed config). Loading does, in order:
  1. read the YAML (a path, or a bare name found in configs/); `base: other.yaml` (beside the file, else in
     configs/) is read first and deep-merged under it;
  2. apply command-line overrides `--section.key=value` (or `--section.key value`), parsed to the field's type;
  3. build the dataclasses; an unknown section or key, or a value of the wrong type, is a UserError naming it;
  4. derive the DeepSpeed batch size, accumulation, clipping and precision from `train` (one source of truth).

    cfg = load_config(VQVAERunConfig, "configs/vqvae_emoji.yaml", ["--train.steps=100"])
    save_config(cfg, run_dir / "config.yaml")        # the resolved config, beside every checkpoint
"""

from __future__ import annotations

import difflib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.tracking.redaction import redact_tree
from vqd.config import deep_merge, find_config, from_dict, parse_overrides, parse_value, read_yaml_with_base, set_dotted
from vqd.config import to_dict as config_to_dict
from vqd.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # where a bare config name (`base_cc.yaml`) is found

# ---- generic sections (programs add their own `model` / `data` / ... dataclasses) ----


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then constant or cosine decay."""

    lr: float = 4.5e-4
    betas: tuple[float, float] = (0.9, 0.96)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine | linear (to min_lr_ratio * lr at train.steps)
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine", "linear"):
            raise UserError(f"schedule: expected constant, cosine or linear, got {self.schedule!r}")
        for name in ("lr", "warmup_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}: expected a value >= 0, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    """Loop length, batch, precision and where the run lives. Batch/clip/precision feed the deepspeed section."""

    steps: int = 1000
    max_minutes: float = 0.0  # > 0: a wall-clock budget for the loop; the run ends sooner if it reaches it (budget.py)
    micro_batch_size: int = 32  # per rank, per forward
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0 = off
    precision: str = "auto"  # auto (bf16 where the GPU or CPU has it natively, else fp32) | fp32 | bf16 | fp16
    seed: int = 0
    run_dir: str = "runs/default"
    resume: str = ""  # "" = fresh, "auto" = latest checkpoint in run_dir/checkpoints, or a checkpoint folder
    save_every: int = 500  # steps between DeepSpeed checkpoints (and exports)
    keep_checkpoints: int = 2  # newest N kept
    log_every: int = 20
    image_every: int = 500  # steps between image grids logged to MLflow
    eval_every: int = 0  # steps between held-out evaluations, and at the last step (0 = none during training)
    num_workers: int = 2  # data loader workers per rank
    init_from: str = ""  # a model folder to start from (fine-tuning)
    ema_decay: float = 0.0  # EMA of weights (0 = off)
    compile: bool = False  # torch.compile the model (GPU runs)


@dataclass
class TrackingConfig:
    """MLflow. uri '' = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db; parent_run_id links a fine-tune to its base."""

    enabled: bool = True
    uri: str = ""
    experiment: str = "vqd"
    run_name: str = ""
    parent_run_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    max_buffered: int = 100_000  # metric values held in memory while the store is away; older ones go to a file
    flush_timeout: float = 60.0  # seconds finish() waits for an absent store before writing what is left to a file


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DERIVED_DS_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                   "bf16", "fp16", "train_batch_size")


# ---- loading ----


def split_cli(argv: list[str] | None = None) -> tuple[str, list[str]]:
    """(config name or path, overrides) from the command line; drops the --local_rank the deepspeed launcher
    appends."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    config = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
            del argv[i:i + 2]
            break
        if a.startswith("--config="):
            config = a.split("=", 1)[1]
            del argv[i]
            break
    if config is None:
        raise UserError(f"missing --config NAME (a file in {CONFIG_DIR}) or --config path/to/run.yaml; --help lists "
                        "the sections and keys")
    return config, argv


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | dict[str, str] | None = None,
                data: dict[str, Any] | None = None):
    """Build the run dataclass `cls` from a YAML file (a path, or a name in configs/) or a dict, plus overrides;
    validated and derived."""
    found = find_config(path, [CONFIG_DIR]) if path is not None else None
    raw = read_yaml_with_base(found, [CONFIG_DIR]) if found is not None else {}
    raw = deep_merge(raw, data or {})
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    hints = typing.get_type_hints(cls)
    for dotted, text in ov.items():
        section, _, key = dotted.partition(".")
        if section not in hints:
            raise UserError(f"--{dotted}: unknown section {section!r}{_did_you_mean(section, hints)}; sections: "
                            f"{', '.join(sorted(hints))}")
        sec_type = hints[section]
        if _is_dict_type(sec_type):  # free-form section (deepspeed): YAML-parse the value
            raw.setdefault(section, {})
            set_dotted(raw[section], key, yaml.safe_load(text))
            continue
        sec_hints = typing.get_type_hints(sec_type)
        if key not in sec_hints:
            raise UserError(f"--{dotted}: unknown key {key!r} in section {section!r}"
                            f"{_did_you_mean(key, sec_hints, section + '.')}; keys: {', '.join(sorted(sec_hints))}")
        raw.setdefault(section, {})[key] = parse_value(text, sec_hints[key], dotted)
    cfg = from_dict(cls, raw)
    if hasattr(cfg, "deepspeed") and hasattr(cfg, "train"):
        cfg.deepspeed = derive_deepspeed(cfg.deepspeed, cfg.train)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    cfg.loaded_from = str(found) if found is not None else ""  # not a field: never saved, never a param
    return cfg


def _did_you_mean(name: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean --{prefix}{close[0]}?)" if close else ""


def derive_deepspeed(ds: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config dict with batch, accumulation, clipping and precision taken from `train`."""
    ds = dict(ds or {})
    if train.precision not in PRECISIONS:
        raise UserError(f"train.precision must be one of {PRECISIONS}, got {train.precision!r}")
    train.precision = resolve_precision(train.precision)
    for name in ("micro_batch_size", "grad_accum"):
        if getattr(train, name) < 1:
            raise UserError(f"train.{name}: expected an integer >= 1, got {getattr(train, name)}")
    if train.max_minutes < 0:
        raise UserError(f"train.max_minutes must be >= 0 (0: no time budget), got {train.max_minutes}")
    derived = {"train_micro_batch_size_per_gpu": train.micro_batch_size,
               "gradient_accumulation_steps": train.grad_accum,
               "gradient_clipping": float(train.grad_clip),
               "bf16": {**ds.get("bf16", {}), "enabled": train.precision == "bf16"},
               "fp16": {**ds.get("fp16", {}), "enabled": train.precision == "fp16"}}
    for k in DERIVED_DS_KEYS:
        if k in ds and not (k in ("bf16", "fp16") and "enabled" not in ds[k]):  # bf16: {other options} is fine
            raise UserError(f"deepspeed.{k} is derived from the train section; set train.micro_batch_size, "
                             f"train.grad_accum, train.grad_clip or train.precision instead")
    ds.update(derived)
    ds.setdefault("steps_per_print", 10 ** 9)  # our progress bar and MLflow do the reporting
    return ds


def native_bf16() -> bool:
    """True where bf16 matmuls run natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX.

    On a CPU without them (AVX2 only) PyTorch emulates bf16 and its matmul runs ~60x slower than fp32.
    """
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # The hardware flag alone is not enough: kernels follow the capability PyTorch dispatches to, which
    # ATEN_CPU_CAPABILITY can lower (to AVX2, whose bf16 path is the slow emulation).
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' where this machine runs it natively, else 'fp32'; other values unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16() else "fp32"


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config (no `base`, overrides applied, secrets masked: redaction.py) as YAML that loads
    again with load_config.

    The deepspeed keys derived from `train` are written as a comment (they are re-derived on loading, so
    a resolved config still accepts `--train.*` overrides).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = redact_tree(config_to_dict(cfg))  # a password in a URI, a token: never written down
    header = ""
    if isinstance(data.get("deepspeed"), dict):
        ds = data["deepspeed"]
        derived = {k: ds.pop(k) for k in DERIVED_DS_KEYS if k in ds}
        for k in ("bf16", "fp16"):  # keep user options of these sections, minus the derived switch
            if isinstance(derived.get(k), dict) and len(derived[k]) > 1:
                ds[k] = {o: v for o, v in derived[k].items() if o != "enabled"}
        header = "# deepspeed, derived from train: " + json.dumps(derived) + "\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (MLflow params)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_dict_type(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict
