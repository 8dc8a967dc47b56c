"""One source of configuration: profiles, model -> profile resolution, CLI flags generated from Settings."""
import json
from dataclasses import fields

import pytest

from conceptor_nb.cli import build_parser, settings_overrides
from conceptor_nb.config import CI, PROFILES, SD, SD_CLIP, TOY, Settings, resolve
from conceptor_nb.method.decomposition import Decomposition
from conceptor_nb.method.decompose import run_settings


def test_every_setting_is_a_cli_flag():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["decompose"]
    dests = {a.dest for a in sub._actions}
    assert {f.name for f in fields(Settings)} <= dests


def test_cli_flags_parse_to_settings():
    args = build_parser().parse_args(["decompose", "a dog", "--steps", "7", "--exclude-threshold", "none",
                                      "--no-flip", "--clip-templates", "authors", "--sampler", "ddim", "--lr", "0.01"])
    over = settings_overrides(args)
    assert over["steps"] == 7 and over["exclude_threshold"] is None and over["flip"] is False
    assert over["sampler"] == "ddim" and over["lr"] == 0.01 and len(over["clip_templates"]) == 27
    # flags not typed are not overrides: the profile decides
    assert "n_train" not in over and "guidance" not in over
    s = TOY.replace(**over)
    assert s.steps == 7 and s.n_train == TOY.n_train


@pytest.mark.parametrize("env, model, expect_profile, expect_clip", [
    ("toy", None, "toy", "toy"),
    ("ci", None, "ci", "toy"),
    ("ci", "toy", "ci", "toy"),
    ("toy", "stabilityai/stable-diffusion-2-1-base", "sd", SD_CLIP),   # never the toy sizes or CLIP for SD
    ("ci", "/some/folder/with/sd", "sd", SD_CLIP),
    ("sd", "toy", "toy", "toy"),
    ("sd", None, "sd", SD_CLIP),
    ("toy", "tiny", "tiny", "tiny"),
])
def test_the_model_picks_its_profile(monkeypatch, capsys, env, model, expect_profile, expect_clip):
    monkeypatch.setenv("CONCEPTOR_PROFILE", env)
    prof, name, clip = resolve(model)
    assert prof.name == expect_profile and clip == expect_clip
    assert name == (model or PROFILES[env].model)
    noted = "note:" in capsys.readouterr().err
    assert noted == (model is not None and PROFILES[env].family != prof.family)


def test_a_folder_the_toy_training_script_wrote_is_a_toy_model(monkeypatch, capsys, tmp_path, tiny_pipe, tiny_clip):
    """`conceptor decompose --model runs/C` on a trained toy world gets the toy profile and the run's own CLIP,
    not Stable Diffusion's sizes and CLIP; a plain pipeline folder stays Stable Diffusion."""
    import torch

    from conceptor_nb import load_pipeline

    run = tmp_path / "runs" / "C"
    tiny_pipe.save_pretrained(run / "pipeline", safe_serialization=True)
    tiny_clip.model.save_pretrained(run / "clip", safe_serialization=True)
    tiny_clip.tokenizer.save_pretrained(run / "clip")
    monkeypatch.setenv("CONCEPTOR_PROFILE", "ci")
    assert resolve(str(run / "pipeline"), warn=False)[0].family == "sd"  # no train_config.json: not a toy run
    (run / "train_config.json").write_text(json.dumps({"mode": "diffusion"}))
    for model in (str(run), str(run / "pipeline")):
        prof, name, clip = resolve(model)
        assert (prof.name, name, clip) == ("ci", model, str(run / "clip"))
        assert "note:" not in capsys.readouterr().err
    pipe = load_pipeline(str(run), device="cpu", dtype=torch.float32)
    assert pipe.unet.config.sample_size == tiny_pipe.unet.config.sample_size
    assert torch.equal(pipe.unet.conv_in.weight, tiny_pipe.unet.conv_in.weight.float())
    monkeypatch.setenv("CONCEPTOR_PROFILE", "sd")
    assert resolve(str(run), "my/clip", warn=False)[0].name == "toy"  # the toy family's profile
    assert resolve(str(run), "my/clip", warn=False)[2] == "my/clip"


def test_a_named_clip_wins(monkeypatch):
    monkeypatch.setenv("CONCEPTOR_PROFILE", "toy")
    assert resolve("stabilityai/stable-diffusion-2-1-base", "my/clip", warn=False)[2] == "my/clip"


def test_none_overrides_are_honoured(tiny_pipe):
    # exclude_threshold=None / null_threshold=None turn the filters off; they used to be dropped silently
    s = run_settings(tiny_pipe, TOY, exclude_threshold=None, null_threshold=None)
    assert s.exclude_threshold is None and s.null_threshold is None
    with pytest.raises(TypeError, match="unknown settings"):
        run_settings(tiny_pipe, TOY, stepz=3)


def test_profiles_differ_where_they_should():
    assert SD.autocast == "auto" and TOY.autocast == "off"
    assert SD.sampler == "lms" and SD.val_sampler == "dpm" and len(SD.clip_templates) == 27
    assert CI.steps < TOY.steps and CI.null_threshold == TOY.null_threshold


def test_decomposition_settings_are_settings_and_round_trip(tmp_path):
    dec = Decomposition("a dog", ["a", "b"], [1, 2], [0.5, 0.25], 2, 1.0, settings=TOY.replace(seed=3))
    dec.save(tmp_path)
    saved = json.loads((tmp_path / "decomposition.json").read_text())["settings"]
    assert saved["sampler"] == "dpm" and saved["seed"] == 3 and "model" not in saved
    back = Decomposition.load(tmp_path)
    assert isinstance(back.settings, Settings) and back.settings == dec.settings


def test_old_files_with_scheduler_names_still_load():
    dec = Decomposition("a dog", ["a"], [1], [0.5], 1, None,
                        settings={"gen_steps": 4, "gen_scheduler": "ddim", "val_scheduler": "euler", "model": "toy"})
    assert dec.settings.sampler == "ddim" and dec.settings.val_sampler == "euler" and dec.settings.gen_steps == 4


def test_model_flags_are_shared_by_decompose_and_batch():
    parser = build_parser()
    for cmd, extra in (("decompose", ["a dog"]), ("batch", ["list.txt", "--out", "runs"])):
        args = parser.parse_args([cmd, *extra, "--model", "x.safetensors", "--model-config", "some/repo"])
        assert args.model == "x.safetensors" and args.model_config == "some/repo"
