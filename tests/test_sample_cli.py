"""training/sample.py and vqd.pipeline on a random micro model folder (with its tokenizer): files, sizes, inpainting."""

import numpy as np
import pytest
import torch
from PIL import Image
from token_data import K, write_tokenizer

from training.sample import main as sample_main
from vqd.errors import exit_on_user_error
from vqd.models import VQDiffusionConfig, VQDiffusionModel
from vqd.pipeline import TextToImage
from vqd.sampling import SamplingConfig


def model_folder(path, condition="text", classes=()):
    torch.manual_seed(0)
    VQDiffusionModel(VQDiffusionConfig(num_codes=K, grid=(4, 4), size="micro", num_timesteps=8, condition=condition,
                                       classes=classes)).save(path)
    write_tokenizer(path / "tokenizer")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("model") / "export")


def test_grid_has_one_captioned_cell_per_image(folder, tmp_path):
    sample_main(["--model", str(folder), "--prompt", "red heart", "--prompt", "house", "--per-prompt", "3",
                 "--steps", "4", "--out", str(tmp_path / "g.png")])
    with Image.open(tmp_path / "g.png") as im:  # 6 cells of 128 px in one row, captions below
        assert im.width == 6 * (128 + 4) + 4 and im.height > 128


def test_prompt_file_writes_native_pngs_in_file_order(folder, tmp_path):
    (tmp_path / "p.txt").write_text("red heart\n\nhouse\nthumbs up medium skin tone\n")
    sample_main(["--model", str(folder), "--prompts", str(tmp_path / "p.txt"), "--out-dir", str(tmp_path / "out"),
                 "--batch", "2", "--steps", "4", "--seed", "3"])
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["0000.png", "0001.png", "0002.png"]  # the blank line is not a prompt
    # numbered in file order: the third file is what the third prompt gives when drawn alone in its batch
    pipe = TextToImage.from_folder(folder)
    g = torch.Generator().manual_seed(3)
    first = pipe.generate(["red heart", "house"], SamplingConfig(steps=4), generator=g)
    third = pipe.generate(["thumbs up medium skin tone"], SamplingConfig(steps=4), generator=g)
    as_png = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()  # noqa: E731
    for name, image in (("0000.png", first[0]), ("0002.png", third[0])):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.size == (16, 16) and np.array_equal(np.asarray(im), as_png(image))


def test_inpainting_keeps_the_unmasked_tokens(folder, tmp_path):
    pipe = TextToImage.from_folder(folder)
    image = torch.rand(3, 16, 16) * 2 - 1
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:8, :5] = True  # rows 0-1 of the 4 x 4 token grid, columns 0-1 (column 1 only partly masked)
    tokens = pipe.inpaint_tokens(["red heart"] * 4, image, mask, SamplingConfig(steps=4),
                                 generator=torch.Generator().manual_seed(0))
    known = pipe.tokenizer.encode(image[None])[0]
    regenerate = torch.zeros(4, 4, dtype=torch.bool)
    regenerate[:2, :2] = True
    regenerate = regenerate.flatten()
    assert torch.equal(tokens[:, ~regenerate], known[~regenerate].expand(4, -1))
    assert (tokens[:, regenerate] != known[regenerate]).any()  # the masked cells were drawn anew

    Image.fromarray(((image.permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(tmp_path / "in.png")
    Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(tmp_path / "mask.png")
    sample_main(["--model", str(folder), "--prompt", "red heart", "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "4", "--out", str(tmp_path / "inpaint.png")])
    assert (tmp_path / "inpaint.png").is_file()


def test_class_and_unconditional_models_and_errors(tmp_path, capsys):
    cls = model_folder(tmp_path / "cls", condition="class", classes=("animal", "heart"))
    sample_main(["--model", str(cls), "--prompt", "heart", "--steps", "4", "--out", str(tmp_path / "c.png")])
    with pytest.raises(ValueError, match="unknown class name"):
        sample_main(["--model", str(cls), "--prompt", "vehicle", "--steps", "4", "--out", str(tmp_path / "c.png")])
    unc = model_folder(tmp_path / "unc", condition="none")
    sample_main(["--model", str(unc), "--count", "3", "--steps", "4", "--out-dir", str(tmp_path / "u"),
                 "--prompts", "/dev/null"])
    assert len(list((tmp_path / "u").iterdir())) == 3
    with pytest.raises(ValueError, match="--prompt"):
        sample_main(["--model", str(cls), "--out", str(tmp_path / "x.png")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # a folder that is no model: one line, exit 2
        exit_on_user_error(sample_main, ["--model", str(tmp_path / "cls" / "tokenizer"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "has no tokenizer/" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:  # a setting the model cannot honour: one line, exit 2
        exit_on_user_error(sample_main, ["--model", str(cls), "--prompt", "heart", "--truncation", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: truncation r must be in (0, 1]") and err.count("\n") == 1
