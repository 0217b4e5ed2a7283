"""Every shipped training config loads, and the paper's configs run through every stage they name.

The paper configs (base_cc.yaml and its fine-tunes) are GPU-sized and condition on OpenAI's CLIP ViT-B/32
text tower. Here they run as shipped except for the denoiser's size, the data (the toy token set) and where
the tower's weights come from: a file of the same architecture written by the test (no real CLIP weights
exist offline). Without any weights they must refuse to start, naming how to supply them.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from launch import REPO, launch, launcher_env
from token_data import write_token_dataset

from training.core.config import load_config
from training.diffusion.config import DiffusionRunConfig, build_model_config
from training.diffusion.data import open_dataset
from training.text.align import AlignRunConfig
from training.tokenizer.config import VQVAERunConfig
from vqd.loading import load_model
from vqd.models import VQDiffusionModel
from vqd.network import openai_vit_b_32
from vqd.text import TextEncoder

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
FINETUNES = [c for c in CONFIGS if c.startswith("finetune_")]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads(name):
    if name.startswith("text_"):  # a text tower's alignment (training/align_text.py): one process, no DeepSpeed
        assert load_config(AlignRunConfig, REPO / "configs" / name).train.steps > 0
        return
    cls = VQVAERunConfig if name.startswith("vqvae") else DiffusionRunConfig
    cfg = load_config(cls, REPO / "configs" / name)
    assert cfg.train.steps > 0 and cfg.deepspeed["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size


def test_finetunes_inherit_the_paper_recipe():
    base = load_config(DiffusionRunConfig, REPO / "configs/base_cc.yaml")
    assert (base.diffusion.num_timesteps, base.optim.betas, base.optim.lr, base.optim.warmup_steps,
            base.train.grad_clip) == (100, (0.9, 0.96), 4.5e-4, 5000, 0.5)
    assert base.model.size == "VQD-B" and base.deepspeed["zero_optimization"]["stage"] == 2 and base.train.ema_decay
    assert len(FINETUNES) >= 4
    for name in FINETUNES:
        cfg = load_config(DiffusionRunConfig, REPO / "configs" / name)
        assert cfg.model == base.model and cfg.diffusion == base.diffusion and cfg.train.init_from
        assert cfg.data.path != base.data.path and cfg.train.run_dir != base.train.run_dir


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_token_dataset(tmp_path_factory.mktemp("toy"), train=60, test=20, per_shard=20)


def test_paper_config_without_clip_weights_refuses_to_start(toy):
    cfg = load_config(DiffusionRunConfig, REPO / "configs/base_cc.yaml", [f"--data.path={toy}", "--data.more_paths=[]"])
    model_cfg = build_model_config(cfg, open_dataset(cfg.data))
    assert model_cfg.text.pretrained == "openai" and model_cfg.text.activation == "quick_gelu"
    with pytest.raises(ValueError, match="not on this machine.*Hugging Face CLIP folder"):
        VQDiffusionModel(model_cfg)  # the tower's weights are read first: nothing of VQD-B's size is built


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    """A ViT-B/32 text tower's weights (random: the architecture and names are what the configs need)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    tower = TextEncoder(openai_vit_b_32(), load_weights=False)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_paper_configs_train_the_base_then_every_fine_tune(tmp_path, toy, clip_file):
    shrink = ["--model.depth=1", "--model.width=64", "--model.heads=2", f"--text.pretrained={clip_file}",
              "--train.compile=false", "--train.micro_batch_size=4", "--train.steps=2", "--train.save_every=2",
              "--train.image_every=2", "--train.eval_every=2", "--train.log_every=1", "--train.num_workers=0",
              f"--data.path={toy}", "--data.more_paths=[]", "--sample.steps=2",
              f"--tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    base = tmp_path / "base"
    out = launch("training/train.py", ["--config", "configs/base_cc.yaml", *shrink, f"--train.run_dir={base}"], ranks=2)
    assert "done: 2 steps" in out.stdout

    model = load_model(base / "export")
    assert model.config.size == "VQD-B" and model.config.text.width == 512 and model.text_encoder is not None
    # one process, no launcher, the four fine-tunes one after another through training.train.main, as a notebook
    # or a sweep script calls it: each must leave the process ready for the next (and the start-up is paid once)
    runs = {name: tmp_path / name for name in FINETUNES}
    argvs = [["--config", f"configs/{name}", *shrink, f"--train.run_dir={run}", f"--train.init_from={base / 'export'}"]
             for name, run in runs.items()]
    code = f"from training.train import main\nfor argv in {argvs!r}:\n    main(argv)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.count("done: 2 steps") == len(FINETUNES), out.stdout[-3000:]
    for run in runs.values():
        assert (run / "export/tokenizer").is_dir() and (run / "export/model.safetensors").is_file()
