"""A model folder's sampling settings (sampling.yaml): the pipeline's defaults, the programs' flags over them field
by field, a sweep's combinations, and the best of a sweep written back with the figures that chose it."""

import argparse

import pytest
import torch
import yaml
from test_sample_cli import model_folder

from training.core.sampling_flags import add_sampling_flags, sampling_settings, settings_source
from training.evaluation.sweep import best_run, write_best
from training.sample import main as sample_main
from vqd.pipeline import TextToImage
from vqd.sampling import SamplingConfig, load_sampling, save_sampling

CHOSEN = SamplingConfig(steps=3, truncation=0.5, guidance_scale=2.0, purity=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = model_folder(tmp_path_factory.mktemp("model") / "export")
    save_sampling(path, CHOSEN, {"how": "a test"})
    return path


def test_settings_round_trip_and_refuse_what_they_do_not_know(tmp_path):
    config = SamplingConfig(steps=7, truncation=0.7, guidance_scale=3.0, purity=True, reveal_order="random",
                            max_reveal=2)
    save_sampling(tmp_path, config, {"how": "measured", "n": 64})
    assert load_sampling(tmp_path) == (config, {"how": "measured", "n": 64})
    assert load_sampling(tmp_path / "nothing") == (SamplingConfig(), {})  # no file: the paper's settings
    assert SamplingConfig.from_dict({"truncation": 1}).truncation == 1.0  # YAML's 1 is a float here
    for bad, match in [({"stepz": 3}, "stepz: unknown key"), ({"purity": "yes"}, "purity: expected bool"),
                       ({"steps": 2.5}, "steps: expected int"), ({"steps": True}, "steps: expected int")]:
        with pytest.raises(ValueError, match=match):
            SamplingConfig.from_dict(bad)
    assert config.override(steps=None, guidance_scale=1.0) == SamplingConfig(
        steps=7, truncation=0.7, guidance_scale=1.0, purity=True, reveal_order="random", max_reveal=2)
    assert SamplingConfig(steps=25, truncation=0.5, guidance_scale=2.0, purity=True).describe(100) == \
        "steps 25 of 100, truncation r 0.5, guidance 2, purity on"


def test_the_folders_settings_are_the_pipelines_defaults(folder, tmp_path):
    pipe = TextToImage.from_folder(folder)
    assert pipe.sampling == CHOSEN and pipe.sampling_chosen_by == {"how": "a test"}
    given = pipe.generate(["red heart"] * 4, CHOSEN, generator=torch.Generator().manual_seed(1))
    default = pipe.generate(["red heart"] * 4, generator=torch.Generator().manual_seed(1))
    paper = pipe.generate(["red heart"] * 4, SamplingConfig(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(given, default) and not torch.equal(default, paper)
    # settings the model cannot honour stop the load, naming the field
    other = model_folder(tmp_path / "other")
    save_sampling(other, SamplingConfig(steps=50), {})
    with pytest.raises(ValueError, match=r"sampling settings do not fit the model: steps must be an int in \[1, 8\]"):
        TextToImage.from_folder(other)


def parse(argv, sweep=False):
    p = argparse.ArgumentParser()
    add_sampling_flags(p, sweep)
    return p.parse_args(argv)


def test_flags_override_the_folder_field_by_field_and_a_sweep_combines_them(folder):
    pipe = TextToImage.from_folder(folder)
    assert sampling_settings(pipe, parse([])) == [CHOSEN]
    assert sampling_settings(pipe, parse(["--guidance", "3", "--no-purity"])) == [
        SamplingConfig(steps=3, truncation=0.5, guidance_scale=3.0, purity=False)]
    sweep = sampling_settings(pipe, parse(["--guidance", "1", "2", "--truncation", "0.5", "0.9", "--purity", "on",
                                           "off"], sweep=True))
    assert [(c.guidance_scale, c.truncation, c.purity) for c in sweep] == [
        (g, r, p) for r in (0.5, 0.9) for g in (1.0, 2.0) for p in (True, False)]  # steps, r, guidance, purity
    assert all(c.steps == 3 for c in sweep)  # the folder's, where no flag says otherwise
    assert [c.purity for c in sampling_settings(pipe, parse(["--purity"], sweep=True))] == [True]
    assert [c.purity for c in sampling_settings(pipe, parse(["--no-purity"], sweep=True))] == [False]
    with pytest.raises(ValueError, match="steps must be an int"):
        sampling_settings(pipe, parse(["--steps", "9"]))
    assert settings_source(pipe, str(folder)).endswith("sampling.yaml: a test")


def test_sample_cli_prints_the_settings_it_used(folder, tmp_path, capsys):
    sample_main(["--model", str(folder), "--prompt", "red heart", "--out", str(tmp_path / "g.png")])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("sampling: steps 3 of 8, truncation r 0.5, guidance 2, purity on (defaults from ")
    sample_main(["--model", str(folder), "--prompt", "red heart", "--steps", "8", "--no-purity", "--out",
                 str(tmp_path / "g.png")])
    assert capsys.readouterr().out.startswith("sampling: steps 8 of 8, truncation r 0.5, guidance 2, purity off")


def run(fid_typed, fid_template, top_typed, guidance):
    """The parts of an evaluation's results a sweep reads."""
    top = {"subcategory": {"top1": top_typed}, "category": {"top1": 0.9}}
    return {"sampling": {**SamplingConfig(steps=3, guidance_scale=guidance).to_dict(), "note": None},
            "forms": {"typed": {"fid": fid_typed, "top1": top}, "template": {"fid": fid_template, "top1": top}},
            "reference_top1": {"real": {"subcategory": {"classes": 99}, "category": {"classes": 11}}},
            "data": "data/emoji", "split": "test", "n_generated": 64, "seed": 0}


def test_a_sweeps_best_is_written_with_the_figures_that_chose_it(tmp_path):
    runs = [run(200.0, 210.0, 0.10, 1.0), run(190.0, 215.0, 0.30, 2.0), run(201.0, 190.0, 0.20, 3.0)]
    assert best_run(runs, "fid") == 2  # mean FID 195.5 against 205 and 202.5
    assert best_run(runs, "top1") == 1  # the finest label (99 classes): subcategory
    path, chosen = write_best(tmp_path, runs, 2, "fid")
    assert chosen == SamplingConfig(steps=3, guidance_scale=3.0) and load_sampling(tmp_path)[0] == chosen
    record = yaml.safe_load(path.read_text())["chosen_by"]
    assert record["how"].startswith("training/evaluate.py: the lowest FID of 3 settings on data/emoji split 'test', N = 64")
    assert [m["fid_template"] for m in record["measured"]] == [210.0, 215.0, 190.0]
    assert record["measured"][1]["subcategory_top1_typed"] == 0.3
    no_probe = [{**r, "reference_top1": {"real": None}} for r in runs]
    with pytest.raises(ValueError, match="--select-by top1: not measured"):
        best_run(no_probe, "top1")
