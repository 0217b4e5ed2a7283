"""A released model through the programs: a diffusers VQ-Diffusion folder fine-tuned by training/train.py on 2 CPU
DeepSpeed ranks (train.init_from = the folder), resumed, exported, and written back with training/convert.py as a
diffusers folder that diffusers runs; the official .pth through the same program."""

from pathlib import Path

import pytest
import torch
from launch import launch
from released_fixtures import TinyPipeline, build_pipeline, load_pipeline
from token_data import write_token_dataset

from vqd.released import read_released

pytest.importorskip("diffusers")

TRAIN = "training/train.py"
# the release's architecture at the trainer's micro size, on the toy set's K = 8 codes and 4 x 4 grid
MICRO = TinyPipeline(codes=8, side=4, steps=10, heads=2, head_dim=16, layers=2, text_width=32, text_layers=1,
                     text_heads=2, hidden_act="gelu")


def args(data: Path, run: Path, db: Path, base: Path, *extra: str) -> list[str]:
    """configs/emoji_base.yaml at micro size with the release's choices: no pooled condition, no convolution in
    the MLP, 77 text tokens, T = 10; lr 0, so that the export can only be the folder's weights."""
    return ["--config", "configs/emoji_base.yaml", f"--data.path={data}", f"--train.run_dir={run}",
            f"--tracking.uri=sqlite:///{db}", "--tracking.experiment=test-released", "--model.size=micro",
            "--model.pooled_condition=false", "--model.local_mixing=false", "--text.pretrained=null",
            "--text.context_length=77", "--text.token_init_std=0.02", "--diffusion.num_timesteps=10",
            f"--train.init_from={base}", "--optim.lr=0.0", "--train.micro_batch_size=8", "--train.precision=fp32",
            "--train.log_every=1", "--train.save_every=2", "--train.eval_every=0", "--train.image_every=2",
            "--sample.count=2", "--sample.steps=2", "--train.num_workers=1", *extra]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_released_folder_fine_tunes_on_two_ranks_resumes_and_goes_back_to_diffusers(tmp_path):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from training.convert import main as convert
    from vqd.loading import load_model

    toy = write_token_dataset(tmp_path / "toy", train=64, test=16, per_shard=16)
    released = build_pipeline(tmp_path / "vq-diffusion-micro", MICRO)
    base = read_released(released)
    run, db = tmp_path / "run", tmp_path / "mlflow.db"
    out = launch(TRAIN, args(toy, run, db, released, "--train.steps=2"))
    assert "done: 2 steps" in out.stdout
    exported = load_file(str(run / "export/model.safetensors"))
    assert exported.keys() == base.tensors.keys()
    assert all(torch.equal(exported[k], base.tensors[k]) for k in exported)  # it started from the folder's weights
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    info = client.get_run((run / "mlflow_run_id.txt").read_text().strip())
    assert info.data.tags["base_model"] == f"{released.resolve()} (diffusers VQDiffusionPipeline)"
    assert info.data.params["train.init_from"] == str(released) and "mlflow.parentRunId" not in info.data.tags
    assert {a.path for a in client.list_artifacts(info.info.run_id, "samples")} == {"samples/step_00000002.png"}

    out = launch(TRAIN, args(toy, run, db, released, "--train.steps=4", "--train.resume=auto"))
    assert "done: 4 steps" in out.stdout and (run / "checkpoints/step_00000004/complete").is_file()

    convert(["to-diffusers", str(run / "export"), "--out", str(tmp_path / "diffusers")])
    pipe, model = load_pipeline(tmp_path / "diffusers"), load_model(run / "export")
    g = torch.Generator().manual_seed(0)
    x, text = torch.randint(0, 9, (2, 16), generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        theirs = pipe.transformer(x, encoder_hidden_states=text, timestep=torch.tensor(3)).sample
        torch.testing.assert_close(model.logits(x, torch.full((2,), 3), text).log_softmax(1), theirs, atol=1e-5, rtol=0)


def test_convert_program_reads_the_official_checkpoint_and_refuses_bad_input(tmp_path, capsys):
    from official_modules import official_model

    from training.convert import main as convert
    from vqd.errors import exit_on_user_error
    from vqd.pipeline import TextToImage

    dalle, files = official_model(tmp_path, gumbel=True, learnable_cf=True)
    convert(["official", str(files["checkpoint"]), "--code-map", str(files["code_map"]), "--heads", "2",
             "--out", str(tmp_path / "vqd")])
    pipe = TextToImage.from_folder(tmp_path / "vqd")
    x, text = torch.randint(0, 17, (2, 16)), torch.randn(2, 77, 128)
    with torch.no_grad():
        torch.testing.assert_close(pipe.model.logits(x, torch.full((2,), 5), text).log_softmax(1),
                                   dalle.transformer.log_p_x0(x, text, torch.full((2,), 5)), atol=1e-5, rtol=0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(convert, ["official", str(files["checkpoint"]), "--heads", "2", "--out", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "code map" in err
    assert not (tmp_path / "nothing").exists()
