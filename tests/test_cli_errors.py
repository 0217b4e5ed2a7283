"""Every user error of the programs users run is one line `error: ...` that names what is wrong and what to do, with
exit status 2 and no traceback. A table: the real entry points as subprocesses for a few cases (what a user's shell
sees), the programs' mains in this process (exit_on_user_error, as their `__main__` runs them) for the rest."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from launch import REPO, launcher_env

from data_pipeline.build import main as build_main
from training.align_text import main as align_main
from training.compare import main as compare_main
from training.convert import main as convert_main
from training.core.config import load_config
from training.diagnose import main as diagnose_main
from training.diffusion.config import DiffusionRunConfig
from training.evaluate import main as evaluate_main
from training.sample import main as sample_main
from training.train import main as train_main
from training.train_vqvae import main as vqvae_main
from vqd.errors import exit_on_user_error

MAINS = {"training/train.py": train_main, "training/train_vqvae.py": vqvae_main, "training/align_text.py": align_main,
         "training/sample.py": sample_main, "training/evaluate.py": evaluate_main, "training/compare.py": compare_main,
         "training/diagnose.py": diagnose_main, "training/convert.py": convert_main, "data_pipeline/build.py": build_main}
CLIP_HINT = "`hf download openai/clip-vit-base-patch32 config.json model.safetensors --local-dir"


@dataclass
class Case:
    name: str
    program: str
    argv: list[str]  # "{tmp}" is the test's folder (the working folder too), "{closed}" a port nothing listens on
    says: tuple[str, ...]  # every one in the error line, in this order
    subprocess: bool = False  # run as a user runs it (a new Python), else its main in this process


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [
    # the trainers' configs (training/core/cli.py): found by bare name, read with the file and line of a mistake
    Case("a bare config name is found in configs/; its data is named with the commands that build it, in order",
         "training/train.py", ["--config", "base_cc.yaml"],
         ("data: 'data/cc3m' and 'data/cc12m' not built yet (no manifest.json)",
          "1) `python data_pipeline/build.py cc3m --stages metadata,filter,download`",
          "2) `deepspeed training/train_vqvae.py --config vqvae_f8_8192.yaml`",
          "3) `python data_pipeline/build.py cc3m`", "4) `python data_pipeline/build.py cc12m`",
          "5) the CLIP text tower ViT-B-32/openai (not on this machine)", CLIP_HINT), subprocess=True),
    Case("a fine-tune's data", "training/train.py", ["--config", "finetune_cub200.yaml"],
         ("data: 'data/cub200' not built yet", "`deepspeed training/train_vqvae.py --config vqvae_f8_8192.yaml`",
          "`python data_pipeline/build.py cub200`")),
    Case("a config that is not there", "training/train.py", ["--config", "nosuch.yaml"],
         ("config file 'nosuch.yaml' does not exist", "base_cc.yaml")),
    Case("a YAML syntax error names the file and the line", "training/train.py", ["--config", "{tmp}/bad.yaml"],
         ("{tmp}/bad.yaml:4:", "YAML syntax error")),
    Case("a typo'd key is named with the key it may mean", "training/train.py",
         ["--config", "emoji_base.yaml", "--train.stpes=5"], ("--train.stpes", "unknown key 'stpes'", "--train.steps")),
    Case("a negative batch size", "training/train.py", ["--config", "emoji_base.yaml", "--train.micro_batch_size=-4"],
         ("train.micro_batch_size: expected an integer >= 1, got -4",)),
    Case("a negative learning rate", "training/train.py", ["--config", "emoji_base.yaml", "--optim.lr=-0.1"],
         ("optim.lr: expected a value >= 0, got -0.1",)),
    Case("an override that is no override", "training/train.py", ["--config", "emoji_base.yaml", "steps=5"],
         ("'steps=5' must look like --section.key=value",)),
    Case("the paper tokenizer before its images are downloaded", "training/train_vqvae.py",
         ["--config", "vqvae_f8_8192.yaml"],
         ("data.source 'data/cc3m/download' matches no file",
          "`python data_pipeline/build.py cc3m --stages metadata,filter,download`")),
    Case("the text aligner's typo", "training/align_text.py", ["--config", "text_emoji.yaml", "--optim.lrr=1"],
         ("unknown key 'lrr'", "--optim.lr")),
    # the data pipeline: inputs checked before Ray starts
    Case("build.py: metadata that is not there", "data_pipeline/build.py", ["cc3m", "--metadata", "/nonexistent"],
         ("--metadata '/nonexistent' does not exist", "cc3m"), subprocess=True),
    Case("build.py: a paper recipe before its tokenizer", "data_pipeline/build.py",
         ["cub200", "--metadata", "{tmp}"],
         ("recipe 'cub200' encodes with the tokenizer 'runs/vqvae_f8_8192/export', which is not there",
          "1) `python data_pipeline/build.py cc3m --stages metadata,filter,download`",
          "2) `deepspeed training/train_vqvae.py --config vqvae_f8_8192.yaml`", "3) this command again",
          "--tokenizer FOLDER")),
    Case("build.py: a data set folder that is not there", "data_pipeline/build.py", ["mscoco", "--stages", "metadata"],
         ("source.path 'datasets/mscoco' is not a folder", "--metadata ROOT")),
    Case("build.py: an unknown recipe", "data_pipeline/build.py", ["cc4m"], ("recipe 'cc4m' not found", "cc3m")),
    Case("build.py: a usage error", "data_pipeline/build.py", ["cc3m", "--stages"],
         ("argument --stages: expected one argument", "--help")),
    # the programs over a model folder or a tracking server
    Case("compare.py: a server that does not answer", "training/compare.py",
         ["--experiment", "vqd-base", "--uri", "http://127.0.0.1:{closed}"],
         ("no MLflow server answers at http://127.0.0.1:{closed} (connection refused)", "cluster/mlflow_server.sh"),
         subprocess=True),
    Case("compare.py: a usage error", "training/compare.py", ["--uri", "sqlite:///x.db"],
         ("the following arguments are required: --experiment", "--help")),
    Case("sample.py: a folder that is no model", "training/sample.py", ["--model", "{tmp}", "--prompt", "a bird"],
         ("model folder '{tmp}' has no tokenizer/ folder",)),
    Case("sample.py: a prompts file that is not there", "training/sample.py",
         ["--model", "{tmp}", "--prompts", "{tmp}/prompts.txt"], ("--prompts '{tmp}/prompts.txt': no such file",)),
    Case("sample.py: half an inpainting", "training/sample.py", ["--model", "{tmp}", "--prompt", "x", "--image", "{tmp}/bad.yaml"],
         ("inpainting needs both --image", "--mask")),
    Case("evaluate.py: a folder that is no model", "training/evaluate.py",
         ["--model", "{tmp}", "--data", "{tmp}/real"], ("model folder '{tmp}' has no tokenizer/ folder",)),
    Case("evaluate.py: a data set that is not built", "training/evaluate.py",
         ["--model", "{tmp}", "--data", "{tmp}/nothing"], ("'{tmp}/nothing' has no download/*.tar",
                                                           "python data_pipeline/build.py")),
    Case("diagnose.py: a data set that is not built", "training/diagnose.py",
         ["--model", "{tmp}", "--data", "data/oxford102"],
         ("dataset folder 'data/oxford102' has no manifest.json", "`python data_pipeline/build.py oxford102`")),
    Case("convert.py: a checkpoint that is not a checkpoint", "training/convert.py",
         ["official", "{tmp}/bad.yaml", "--out", "{tmp}/out"], ("{tmp}/bad.yaml", "torch.load(weights_only=True)"),
         subprocess=True),
    Case("convert.py: a checkpoint that is not there", "training/convert.py",
         ["official", "{tmp}/ithq_learnable.pth", "--out", "{tmp}/out"],
         ("'{tmp}/ithq_learnable.pth': no such file or folder",)),
    Case("convert.py: a usage error", "training/convert.py", ["officail"], ("invalid choice: 'officail'",)),
]


def run_case(case: Case, tmp: Path, capfd) -> tuple[int, str]:
    """(exit status, stderr) of the case, run from `tmp` with no tracking server or CLIP weights of this machine."""
    port = str(closed_port())
    argv = [a.replace("{tmp}", str(tmp)).replace("{closed}", port) for a in case.argv]
    if case.subprocess:
        out = subprocess.run([sys.executable, str(REPO / case.program), *argv], cwd=tmp, env=launcher_env(),
                             capture_output=True, text=True, timeout=300)
        return out.returncode, out.stderr
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(MAINS[case.program], argv)
    return stop.value.code, capfd.readouterr().err


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A working folder with nothing built, a broken YAML file, a data set's real images (an empty tar), and a
    Hugging Face cache without CLIP weights."""
    (tmp_path / "bad.yaml").write_text("model:\n  size: tiny\n  depth: [1, 2\ntrain:\n  steps: 3\n")
    (tmp_path / "real/download").mkdir(parents=True)
    (tmp_path / "real/download/00000.tar").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))  # whatever this machine has cached
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "VQD_TRACEBACK"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_user_error_is_one_line_naming_what_to_do(case, world, capfd, monkeypatch):
    if case.subprocess:
        monkeypatch.setenv("HF_HUB_CACHE", str(world / "hf_cache"))  # launcher_env() copies os.environ
    code, err = run_case(case, world, capfd)
    port_free = [c.replace("{tmp}", str(world)) for c in case.says]
    assert code == 2, err[-3000:]
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err[-3000:]
    line, at = err.strip(), 0
    for needle in port_free:
        if "{closed}" in needle:  # the port is the case's own: match around it
            head, tail = needle.split("{closed}")
            assert head in line and tail in line, (needle, line)
            continue
        found = line.find(needle, at)
        assert found >= 0, f"{needle!r} not (in order) in {line!r}"
        at = found + len(needle)
    assert not (world / "data").exists() or not any((world / "data").rglob("recipe.json"))  # a refusal stamps nothing


def test_the_traceback_is_there_when_asked_for(world, capfd, monkeypatch):
    monkeypatch.setenv("VQD_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unknown key 'stpes'"):
        exit_on_user_error(train_main, ["--config", "emoji_base.yaml", "--train.stpes=5"])


def test_help_lists_every_section_and_key_with_its_type_and_default(world):
    out = subprocess.run([sys.executable, str(REPO / "training/train.py"), "--help"], cwd=world, env=launcher_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and not out.stderr.strip().startswith("error"), out.stderr[-2000:]
    for line in ("train.steps: int = 1000", "train.micro_batch_size: int = 32", "optim.lr: float = 0.00045",
                 "data.path: str = 'data/emoji'", "model.size: str | None = 'tiny'"):
        assert line in out.stdout, line
    for section in ("model:", "diffusion:", "data:", "optim:", "train:", "sample:", "tracking:", "deepspeed:"):
        assert f"\n{section}" in out.stdout, section


def test_a_fine_tune_config_copied_elsewhere_finds_its_base_in_configs(world):
    mine = world / "my_configs" / "finetune_birds.yaml"
    mine.parent.mkdir()
    shutil.copy(REPO / "configs/finetune_cub200.yaml", mine)
    cfg = load_config(DiffusionRunConfig, mine)
    assert cfg.model.size == "VQD-B" and cfg.optim.betas == (0.9, 0.96)  # from configs/base_cc.yaml
    assert cfg.data.path == "data/cub200" and cfg.train.init_from == "runs/base_cc/export"  # its own
    (mine.parent / "base_cc.yaml").write_text("train:\n  steps: 7\n")  # a base beside the file wins
    assert load_config(DiffusionRunConfig, mine).train.steps == 100000
    assert load_config(DiffusionRunConfig, mine).model.size == "tiny"
