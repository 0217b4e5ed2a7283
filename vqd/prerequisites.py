"""What a command needs before it can run, and the commands that make it, in order: the hints of build.py and the
trainers when a data set or a tokenizer is missing. Read from the repository's configs (a recipe names the
tokenizer its encode stage uses; a tokenizer config names the images it trains on), so a hint follows the configs.

    data_steps(["data/cc3m", "data/cc12m"])
    # ['python data_pipeline/build.py cc3m --stages metadata,filter,download',
    #  'deepspeed training/train_vqvae.py --config vqvae_f8_8192.yaml',
    #  'python data_pipeline/build.py cc3m', 'python data_pipeline/build.py cc12m']

The paper path: download a recipe's images, train the tokenizer on them, encode every recipe with it. Paths are
read relative to the working folder, as the commands read them. Nothing here fails: without configs (vqd
installed alone) the lists are empty and the callers fall back on their own words.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
RECIPE_DIR = CONFIG_DIR / "data"
WEIGHTS = "model.safetensors"  # a tokenizer folder's weights (vqd.io.WEIGHTS_NAME)
DOWNLOADED = re.compile(r"(?:\./)?data/([\w.-]+)/download(?:/(?:\*\.tar)?)?")  # a recipe's download stage tars


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _same(a: str | Path, b: str | Path) -> bool:
    return os.path.normpath(str(a)) == os.path.normpath(str(b))


def recipe_of(folder: str | Path) -> str | None:
    """The recipe that builds a data set folder (its name is the folder's: data/cc3m, /shared/data/cc3m), if any."""
    name = Path(folder).name
    return name if (RECIPE_DIR / f"{name}.yaml").is_file() else None


def recipe_tokenizer(recipe: str) -> str:
    """The tokenizer folder a recipe's encode stage reads ('' when it names none)."""
    return str(_yaml(RECIPE_DIR / f"{recipe}.yaml").get("tokenizer") or "")


def tokenizer_config(folder: str | Path) -> Path | None:
    """The tokenizer config in configs/ whose run exports `folder` (its train.run_dir + /export), if any."""
    for path in sorted(CONFIG_DIR.glob("vqvae*.yaml")):
        run_dir = (_yaml(path).get("train") or {}).get("run_dir")
        if run_dir and _same(Path(run_dir) / "export", folder):
            return path
    return None


def image_steps(source: str) -> list[str]:
    """The build commands that download the images a tokenizer config's data.source reads, where not done yet."""
    steps = []
    for part in source.split(","):
        m = DOWNLOADED.fullmatch(part.strip())
        if m and not (Path(part.strip().split("*")[0]) / "_DONE.json").is_file():
            steps.append(f"python data_pipeline/build.py {m.group(1)} --stages metadata,filter,download")
    return steps


def tokenizer_steps(folder: str | Path) -> list[str]:
    """The commands that make a missing tokenizer folder (its images, then its training); [] when it exists or
    no config in configs/ makes it."""
    if not folder or (Path(folder) / WEIGHTS).is_file():
        return []
    config = tokenizer_config(folder)
    if config is None:
        return []
    source = str((_yaml(config).get("data") or {}).get("source") or "")
    return image_steps(source) + [f"deepspeed training/train_vqvae.py --config {config.name}"]


def data_steps(folders: list[str | Path]) -> list[str]:
    """The commands that build the data set folders, in order: the tokenizers they are encoded with first."""
    steps: list[str] = []
    for folder in folders:
        recipe = recipe_of(folder)
        if recipe is None:
            steps.append(f"python data_pipeline/build.py <recipe> --out {folder}")
            continue
        steps += [s for s in tokenizer_steps(recipe_tokenizer(recipe)) if s not in steps]
        out = "" if _same(folder, Path("data") / recipe) else f" --out {folder}"
        steps.append(f"python data_pipeline/build.py {recipe}{out}")
    return steps


def numbered(commands: list[str], then: list[str] = ()) -> str:
    """'1) `a`; 2) `b`; 3) c': the commands quoted, then the steps told in words (one line)."""
    items = [f"`{c}`" for c in commands] + list(then)
    return "; ".join(f"{i}) {item}" for i, item in enumerate(items, 1))
