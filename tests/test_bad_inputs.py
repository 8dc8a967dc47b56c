"""Bad inputs at every public entry point: one row per case.

Each row asserts the error type (InvalidInputError unless said), a fragment of the message (the
argument's name, the bad value or what is accepted), that no image was generated and no CLIP loaded
before the error (the check comes first), and that no file under the cache or the output folder was
written or changed.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import conceptor_nb
from conceptor_nb import Decomposition, decompose, detect_bias, explain_image, mitigate_bias, set_coefficient, sweep
from conceptor_nb.checks import as_images, parse_concept, validate_settings
from conceptor_nb.config import TINY
from conceptor_nb.errors import InvalidInputError
from conceptor_nb.io import slug as folder_name

FAST = TINY.replace(n_train=2, n_val=0, steps=2, gen_steps=2, val_steps=2, dict_size=8, val_every=0)
ATTR = {"red": ["red"], "blue": ["blue"]}


def fake_dec(**kw) -> Decomposition:
    base = dict(concept="a dog", tokens=["red", "blue", "cat"], token_ids=[736, 1746, 2368],
                coefficients=[0.5, 0.3, 0.1], n_tokens=2, norm=0.5, prompt="a photo of a dog", model="tiny",
                clip="tiny", dictionary_scores=[0.3, 0.2, 0.1], settings=FAST)
    base.update(kw)
    return Decomposition(**base)


def save_then(edit):
    """A prepare step: save a good decomposition into ctx.tmp/'d', then apply ``edit(folder)``."""
    def prepare(ctx):
        folder = ctx.tmp / "d"
        fake_dec().save(folder)
        edit(folder)
    return prepare


def edit_json(**changes):
    def edit(folder):
        file = folder / "decomposition.json"
        meta = json.loads(file.read_text())
        meta.update(changes)
        file.write_text(json.dumps(meta))
    return edit


class Ctx:
    def __init__(self, pipe, tmp):
        self.pipe, self.tmp, self.dec = pipe, tmp, fake_dec()


def D(**kw):  # decompose with FAST settings and overrides
    return lambda c: decompose(c.pipe, "a dog", settings=FAST, verbose=False, **kw)


IMG = torch.rand(2, 3, 32, 32)
# a pickle that would create a file if it were ever unpickled (pickle protocol 0: os.system is not needed, the
# file's name says it all): pickled weights must never be loaded
PICKLE = b"cbuiltins\nopen\n(S'UNPICKLED'\nS'w'\ntR."

CASES = [
    # id, call(ctx), error type, message fragment, prepare(ctx) or None
    ("steps 0", D(steps=0), InvalidInputError, "steps must be an integer >= 1, got 0", None),
    ("steps -5", D(steps=-5), InvalidInputError, "steps must be an integer >= 1, got -5", None),
    ("steps '10'", D(steps="10"), InvalidInputError, "steps must be an integer >= 1, got '10' (str)", None),
    ("steps True", D(steps=True), InvalidInputError, "got True (bool)", None),
    ("gen_steps 0", D(gen_steps=0), InvalidInputError, "gen_steps must be an integer >= 1", None),
    ("n_tokens 0", D(n_tokens=0), InvalidInputError, "n_tokens must be an integer >= 1", None),
    ("batch_size 0", D(batch_size=0), InvalidInputError, "batch_size must be an integer >= 1", None),
    ("n_val -1", D(n_val=-1), InvalidInputError, "n_val must be an integer >= 0", None),
    ("lr 1e30", D(lr=1e30), InvalidInputError, "lr must be a finite number > 0.0 and <= 1.0, got 1e+30", None),
    ("lr 0", D(lr=0.0), InvalidInputError, "lr must be a finite number > 0.0", None),
    ("guidance nan", D(guidance=math.nan), InvalidInputError, "guidance must be a finite number", None),
    ("sparsity nan", D(sparsity=math.nan), InvalidInputError, "sparsity must be a finite number >= 0.0", None),
    ("sparsity inf", D(sparsity=math.inf), InvalidInputError, "got inf", None),
    ("min_timestep 1", D(min_timestep=1.0), InvalidInputError, "min_timestep must be a finite number >= 0.0 and <= 0.99", None),
    ("seed 2**70", D(seed=2**70), InvalidInputError, "seed must be an integer >= 0 and <= ", None),
    ("seed -1", D(seed=-1), InvalidInputError, "seed must be an integer >= 0", None),
    ("sampler bogus", D(sampler="bogus"), InvalidInputError, "sampler must be one of 'ddim'", None),
    ("autocast fp8", D(autocast="fp8"), InvalidInputError, "autocast must be one of 'auto', 'bf16', 'off'", None),
    ("flip 'yes'", D(flip="yes"), InvalidInputError, "flip must be True or False", None),
    ("template no {}", D(template="a photo"), InvalidInputError, "template must be a string with exactly one '{}'", None),
    ("exclude_threshold 2", D(exclude_threshold=2.0), InvalidInputError, "exclude_threshold must be a finite number >= -1.0 and <= 1.0", None),
    ("dict_size 10**6", D(dict_size=10**6), InvalidInputError, "dict_size must be an integer between 1 and the vocabulary's", None),
    ("unknown setting", D(stepz=3), InvalidInputError, "unknown setting 'stepz'; did you mean 'steps'?", None),
    ("settings a string", lambda c: decompose(c.pipe, "a dog", settings="toy", verbose=False), InvalidInputError,
     "settings must be a conceptor_nb.Settings", None),
    ("concept None", lambda c: decompose(c.pipe, None, settings=FAST, verbose=False), InvalidInputError,
     "concept must be a word or a short phrase", None),
    ("concept blank", lambda c: decompose(c.pipe, "  \t ", settings=FAST, verbose=False), InvalidInputError,
     "the concept is empty", None),
    ("concept 'a photo of'", lambda c: decompose(c.pipe, "a photo of", settings=FAST, verbose=False), InvalidInputError,
     "it names no thing", None),
    ("concept with {}", lambda c: decompose(c.pipe, "a {} dog", settings=FAST, verbose=False), InvalidInputError,
     "without '{' or '}'", None),
    ("concept too long", lambda c: decompose(c.pipe, "dog " * 100, settings=FAST, verbose=False), ValueError,
     "context", None),
    ("pipe not a pipeline", lambda c: decompose("tiny", "a dog", settings=FAST, verbose=False), InvalidInputError,
     "pipe must be a diffusers pipeline", None),
    ("images 0-255 floats", D(images=IMG * 255), InvalidInputError, "it looks like 0-255", None),
    ("images NaN", D(images=torch.full((2, 3, 32, 32), math.nan)), InvalidInputError, "NaN/inf", None),
    ("images 2 channels", D(images=torch.rand(2, 2, 32, 32)), InvalidInputError, "1 (gray), 3 (RGB) or 4 (RGBA) channels", None),
    ("images empty", D(images=torch.rand(0, 3, 32, 32)), InvalidInputError, "a non-empty batch", None),
    ("images int32", D(images=torch.zeros(2, 3, 32, 32, dtype=torch.int32)), InvalidInputError, "float in [0, 1] or uint8", None),
    ("images [-1,1]", D(images=IMG * 2 - 1), InvalidInputError, "(x + 1) / 2", None),
    ("images a string", D(images="cat.png"), InvalidInputError, "images must be images", None),
    ("dictionary wrong", D(dictionary=[1, 2]), InvalidInputError, "dictionary must be a non-empty conceptor_nb.Dictionary", None),
    # applications
    ("explain seed -1", lambda c: explain_image(c.pipe, c.dec, -1), InvalidInputError, "seed must be an integer >= 0", None),
    ("explain seed 2**70", lambda c: explain_image(c.pipe, c.dec, 2**70), InvalidInputError, "seed must be", None),
    ("explain threshold nan", lambda c: explain_image(c.pipe, c.dec, 0, threshold=math.nan), InvalidInputError,
     "threshold must be a finite number", None),
    ("explain steps 0", lambda c: explain_image(c.pipe, c.dec, 0, steps=0), InvalidInputError, "steps must be an integer >= 1", None),
    ("explain dec a path", lambda c: explain_image(c.pipe, "runs/dog", 0), InvalidInputError,
     "dec must be a conceptor_nb.Decomposition", None),
    ("bias one value", lambda c: detect_bias(c.pipe, c.dec, {"red": ["red"]}), InvalidInputError,
     "attribute must be a dict mapping at least two values", None),
    ("bias empty words", lambda c: detect_bias(c.pipe, c.dec, {"red": [], "blue": ["blue"]}), InvalidInputError,
     "attribute['red'] must be a non-empty list of words", None),
    ("bias images 0-255", lambda c: detect_bias(c.pipe, c.dec, ATTR, images=IMG * 255), InvalidInputError,
     "it looks like 0-255", None),
    ("bias n 0", lambda c: detect_bias(c.pipe, c.dec, ATTR, n=0), InvalidInputError, "n must be an integer >= 1", None),
    ("bias oracle not callable", lambda c: detect_bias(c.pipe, c.dec, ATTR, oracle="clip"), InvalidInputError,
     "oracle must be a function", None),
    ("mitigate target sum", lambda c: mitigate_bias(c.pipe, c.dec, ATTR, {"red": 0.9, "blue": 0.9}), InvalidInputError,
     "target must be a share in [0, 1] for each of ['red', 'blue'], summing to 1", None),
    ("mitigate tolerance 0", lambda c: mitigate_bias(c.pipe, c.dec, ATTR, tolerance=0), InvalidInputError,
     "tolerance must be a finite number > 0.0", None),
    ("sweep value nan", lambda c: sweep(c.pipe, c.dec, "red", [0.1, math.nan], [0]), InvalidInputError,
     "values[1] must be a finite number >= 0.0, got nan", None),
    ("sweep no seeds", lambda c: sweep(c.pipe, c.dec, "red", [0.1], []), InvalidInputError,
     "seeds must be a non-empty list of integer seeds", None),
    ("sweep two words", lambda c: sweep(c.pipe, c.dec, "red car", [0.1], [0]), InvalidInputError,
     "token must be a single word", None),
    ("set_coefficient nan", lambda c: set_coefficient(c.dec, "red", math.nan), InvalidInputError,
     "value must be a finite non-negative number (coefficients are alpha = |f(w)|), got nan", None),
    ("set_coefficient -1", lambda c: set_coefficient(c.dec, "red", -1), InvalidInputError,
     "value must be a finite non-negative number (coefficients are alpha = |f(w)|), got -1", None),
    # loading
    ("load missing folder", lambda c: Decomposition.load(c.tmp / "nowhere"), InvalidInputError, "it does not exist", None),
    ("load folder is a file", lambda c: Decomposition.load(c.tmp / "f"), InvalidInputError, "it is a file",
     lambda c: (c.tmp / "f").write_text("x")),
    ("load not JSON", lambda c: Decomposition.load(c.tmp / "d"), InvalidInputError, "is not valid JSON",
     save_then(lambda f: (f / "decomposition.json").write_text("{oops"))),
    ("load lengths differ", lambda c: Decomposition.load(c.tmp / "d"), InvalidInputError,
     "token ids differ", save_then(edit_json(token_ids=[736, 1746]))),
    ("load lengths differ (json only)", lambda c: Decomposition.load(c.tmp / "d"), InvalidInputError,
     "they have 3, 3 and 2", save_then(lambda f: ((f / "coefficients.safetensors").unlink(),
                                                  edit_json(coefficients=[0.5, 0.3])(f)))),
    ("load hand-edited coefficient", lambda c: Decomposition.load(c.tmp / "d"), InvalidInputError,
     "differ from those in", save_then(edit_json(coefficients=[0.9, 0.3, 0.1]))),
    ("load null coefficient", lambda c: Decomposition.load(c.tmp / "d"), InvalidInputError,
     "entry 1 ('blue') is None", save_then(lambda f: ((f / "coefficients.safetensors").unlink(),
                                                      edit_json(coefficients=[0.5, None, 0.1])(f)))),
    ("load n_tokens 0", lambda c: Decomposition.load(c.tmp / "d"), InvalidInputError,
     "n_tokens must be an integer between 1 and 3, got 0", save_then(edit_json(n_tokens=0))),
    ("load missing field", lambda c: Decomposition.load(c.tmp / "d"), InvalidInputError,
     "lacks the field(s) tokens", save_then(lambda f: (f / "decomposition.json").write_text(
         json.dumps({k: v for k, v in json.loads((f / "decomposition.json").read_text()).items() if k != "tokens"})))),
    # issue 25, item 8: a decomposition used with a pipeline it does not belong to; absurd values at load
    ("render another model's", lambda c: fake_dec(model="toy").render(c.pipe, [0]), InvalidInputError,
     "fitted on model 'toy', not on this pipeline's 'tiny'", None),
    ("explain another model's", lambda c: explain_image(c.pipe, fake_dec(model="toy"), 0), InvalidInputError,
     "fitted on model 'toy'", None),
    ("sweep another model's", lambda c: sweep(c.pipe, fake_dec(model="toy"), "red", [0.1], [0]), InvalidInputError,
     "fitted on model 'toy'", None),
    ("bias another model's", lambda c: detect_bias(c.pipe, fake_dec(model="toy"), ATTR), InvalidInputError,
     "fitted on model 'toy'", None),
    ("load renamed token, render", lambda c: Decomposition.load(c.tmp / "d").render(c.pipe, [0]), InvalidInputError,
     "token 'obama' is not the token of id 736 in this model's vocabulary ('red')",
     save_then(edit_json(tokens=["obama", "blue", "cat"]))),
    ("load norm 1e300", lambda c: Decomposition.load(c.tmp / "d"), InvalidInputError,
     "norm must be a number in (0, 1000]", save_then(edit_json(norm=1e300))),
    ("load SDXL norm 1e300", lambda c: Decomposition.load(c.tmp / "d"), InvalidInputError,
     "norm must be a number in (0, 1000]", save_then(edit_json(norm=[[16, 0.4], [16, 1e300]]))),
    # issue 25, item 9: clear errors before any work, not raw IndexError / KeyError / RecursionError
    ("load token id 10**9, render", lambda c: Decomposition.load(c.tmp / "d").render(c.pipe, [0]), InvalidInputError,
     "token id 1000000000 is outside this model's vocabulary of 49408 tokens",
     save_then(lambda f: ((f / "coefficients.safetensors").unlink(), edit_json(token_ids=[10**9, 1746, 2368])(f)))),
    ("load template {x}", lambda c: Decomposition.load(c.tmp / "d"), InvalidInputError,
     "template must be a string with exactly one '{}'", save_then(edit_json(template="a photo of {x} {}"))),
    ("load nested 10**5 deep", lambda c: Decomposition.load(c.tmp / "d"), InvalidInputError,
     "is not valid JSON (RecursionError", save_then(lambda f: (f / "decomposition.json").write_text(
         '{"concept": ' + "[" * 10**5 + "]" * 10**5 + "}"))),
    ("mitigate multi-token word", lambda c: mitigate_bias(c.pipe, c.dec, {"red": ["red"], "blue": ["xqzvblorf"]}),
     InvalidInputError, "attribute['blue']: 'xqzvblorf' is 7 tokens in this model's vocabulary; mitigation raises", None),
    ("bias word in two values", lambda c: detect_bias(c.pipe, c.dec, {"red": ["red", "crimson"], "blue": ["Red "]}),
     InvalidInputError, "the word 'red' is in two values, 'red' and 'blue'", None),
    ("images (3, H, W)", lambda c: detect_bias(c.pipe, c.dec, ATTR, images=torch.rand(3, 32, 32)), InvalidInputError,
     "a (3, H, W) tensor is one image or 3 grayscale ones; pass x[None] for one image, x[:, None] for 3", None),
    ("clip folder of a pickle", lambda c: conceptor_nb.load_clip(str(c.tmp / "clip")), InvalidInputError,
     "holds no .safetensors weights (it holds config.json, pytorch_model.bin); pickled weights",
     lambda c: ((c.tmp / "clip").mkdir(), (c.tmp / "clip" / "config.json").write_text("{}"),
                (c.tmp / "clip" / "pytorch_model.bin").write_bytes(PICKLE))),
]


def snapshot(*folders) -> dict:
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                p = Path(root) / name
                out[str(p)] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Generation and CLIP loading fail the test: a bad input must be refused before any work."""
    import conceptor_nb.method.decompose as conceptor_mod
    import conceptor_nb.method.decomposition as decomposition_mod
    import conceptor_nb.method.fit as fit_mod
    import conceptor_nb.apps.explain as explain_mod
    import conceptor_nb.clip as clip_mod
    import conceptor_nb.method.generate as images_mod

    def work(*a, **k):
        raise AssertionError("work started before the input was checked")

    for mod in (images_mod, fit_mod, decomposition_mod, explain_mod):
        monkeypatch.setattr(mod, "generate", work)
    monkeypatch.setattr(conceptor_mod, "concept_images", work)
    monkeypatch.setattr(clip_mod, "load_clip", work)


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tiny_pipe, tmp_path, cache, no_work):
    _, call, err, fragment, prepare = case
    ctx = Ctx(tiny_pipe, tmp_path / "out")
    ctx.tmp.mkdir()
    if prepare is not None:
        prepare(ctx)
    before = snapshot(cache, ctx.tmp)
    with pytest.raises(err) as info:
        call(ctx)
    assert fragment in str(info.value), str(info.value)
    assert snapshot(cache, ctx.tmp) == before
    assert not Path("UNPICKLED").exists()


def test_bias_warns_of_words_that_can_never_be_tokens(tiny_pipe, tiny_clip):
    """Issue 25, item 9: gibberish (several tokens) used to give shares with no warning."""
    with pytest.warns(UserWarning, match="'xqzvblorf'.*can never be a decomposition's tokens"):
        report = detect_bias(tiny_pipe, fake_dec(), {"red": ["red"], "blue": ["xqzvblorf"]}, clip=tiny_clip, images=IMG)
    assert report.coefficient_share["blue"] == 0 and report.n_images == 2


def test_errors_are_one_type_that_is_also_a_value_error():
    assert issubclass(InvalidInputError, conceptor_nb.ConceptorError) and issubclass(InvalidInputError, ValueError)


def test_validate_settings_accepts_the_profiles_and_normalises():
    from conceptor_nb.config import PROFILES

    for p in PROFILES.values():
        assert validate_settings(p.settings) == p.settings
    s = validate_settings(FAST.replace(steps=np.int64(7), clip_templates=["a {}"]))
    assert type(s.steps) is int and s.steps == 7 and s.clip_templates == ("a {}",)


def test_one_concept_parser():
    assert parse_concept("a dog") == ("dog", "a photo of a dog")
    assert parse_concept("  The   Red Car ") == ("red car", "a photo of a Red Car")
    assert parse_concept("a photo of an apple") == ("apple", "a photo of an apple")
    assert parse_concept("dog", "a painting of a {}") == ("dog", "a painting of a dog")
    assert parse_concept("an owl")[1] == "a photo of a owl" and parse_concept("a photo of the owl")[0] == "owl"


def test_default_folder_names_are_short_and_distinct():
    long1, long2 = "word " * 70 + "one", "word " * 70 + "two"
    a, b = folder_name(long1), folder_name(long2)
    assert len(a) <= 48 and len(b) <= 48 and a != b
    assert folder_name("a dog") == "a-dog" and folder_name("!!!") == "concept"


# -- external images ---------------------------------------------------------------------------
def test_image_forms_agree():
    from PIL import Image

    u8 = (torch.rand(2, 3, 32, 32) * 255).round().to(torch.uint8)
    ref = u8.float() / 255
    assert torch.equal(as_images(ref), ref)
    assert torch.equal(as_images(u8), ref)
    assert torch.equal(as_images(u8.permute(0, 2, 3, 1).numpy()), ref)  # channels-last numpy
    assert torch.equal(as_images(u8[0][None]), ref[:1])
    with pytest.warns(UserWarning, match="grayscale"):
        assert torch.equal(as_images(u8[0, 0]), ref[:1, :1].expand(1, 3, 32, 32))
    pil = [Image.fromarray(a) for a in u8.permute(0, 2, 3, 1).numpy()]
    assert torch.equal(as_images(pil), ref)
    with pytest.warns(UserWarning, match="grayscale"):
        gray = as_images(u8[:, :1])
    assert gray.shape == (2, 3, 32, 32) and torch.equal(gray[:, 0], gray[:, 2])
    with pytest.warns(UserWarning, match="alpha"):
        assert torch.equal(as_images(torch.cat([ref, torch.ones(2, 1, 32, 32)], 1)), ref)
    with pytest.warns(UserWarning, match="resized to the model's 32x32"):
        small = as_images(torch.rand(2, 3, 48, 64), size=32)
    assert small.shape == (2, 3, 32, 32) and 0 <= small.min() and small.max() <= 1


def test_bias_report_is_the_same_for_uint8_and_float_images(tiny_pipe, tiny_clip):
    """0-255 floats used to pass silently and change the report; now uint8 and [0, 1] floats agree."""
    dec = fake_dec()
    u8 = (torch.rand(6, 3, 32, 32) * 255).round().to(torch.uint8)
    a = detect_bias(tiny_pipe, dec, ATTR, clip=tiny_clip, images=u8)
    b = detect_bias(tiny_pipe, dec, ATTR, clip=tiny_clip, images=u8.float() / 255)
    assert a.labels == b.labels and a.image_share == b.image_share


# -- JSON ----------------------------------------------------------------------------------------
def test_decomposition_json_is_strict(tmp_path):
    dec = set_coefficient(fake_dec(history={"best_score": math.nan}), "dog", 0.2, tokenizer=_tokenizer())
    assert any(math.isnan(x) for x in dec.dictionary_scores)
    dec.save(tmp_path / "d")

    def refuse(name):
        raise ValueError(f"bare {name} in the JSON")

    meta = json.loads((tmp_path / "d" / "decomposition.json").read_text(), parse_constant=refuse)
    assert meta["history"]["best_score"] is None and None in meta["dictionary_scores"]
    back = Decomposition.load(tmp_path / "d")
    assert back.coefficients == pytest.approx(dec.coefficients, rel=1e-7) and back.tokens == dec.tokens
    assert math.isnan(back.dictionary_scores[back.tokens.index("dog")])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        fake_dec().save(tmp_path / "d")
    finally:
        os.umask(old)
    for f in (tmp_path / "d").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_save_refuses_before_writing_anything(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "coefficients.safetensors").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="coefficients.safetensors"):
        fake_dec().save(folder)
    assert (folder / "coefficients.safetensors").read_bytes() == b"user data"
    assert not (folder / "decomposition.json").exists()


def _tokenizer():
    from conceptor_nb.clip import clip_tokenizer

    return clip_tokenizer()


# -- the command line: every check before any model is loaded; exit code 2, one line, nothing written -----
TINY_ARGS = ["--model", "tiny", "--quiet", "--n-train", "2", "--n-val", "0", "--steps", "2", "--gen-steps", "2",
             "--dict-size", "8", "--val-every", "0"]


def _user_file(name):
    def prepare(out):
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"the user's own file")
    return prepare


CLI_CASES = [
    # id, extra argv (OUT is replaced by the output folder), prepare(out) or None, stderr fragment
    ("cli steps 0", ["--steps", "0"], None, "steps must be an integer >= 1, got 0"),
    ("cli lr 1e30", ["--lr", "1e30"], None, "lr must be a finite number > 0.0 and <= 1.0"),
    ("cli guidance nan", ["--guidance", "nan"], None, "guidance must be a finite number"),
    ("cli sparsity nan", ["--sparsity", "nan"], None, "sparsity must be a finite number"),
    ("cli seed 2**70", ["--seed", str(2**70)], None, "seed must be an integer >= 0 and <= "),
    ("cli batch 0", ["--batch-size", "0"], None, "batch_size must be an integer >= 1"),
    ("cli show -1", ["--show", "-1"], None, "--show must be an integer >= 0"),
    ("cli out is a file", [], lambda out: out.write_text("x"), "is a file, not a folder"),
    ("cli out unwritable", ["--out", "/proc/conceptor-test/run"], None, "cannot write to --out /proc/conceptor-test/run"),
    ("cli user's concept.png", [], _user_file("concept.png"), "already holds concept.png"),
    ("cli earlier decomposition", [], _user_file("decomposition.json"), "already holds decomposition.json"),
    ("cli resume without a run", ["--resume"], None, "holds no interrupted run"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, tmp_path, cache, capsys, monkeypatch):
    from conceptor_nb.cli import main

    _, extra, prepare, fragment = case

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(conceptor_nb.cli, "load_pipeline", no_load)
    out = tmp_path / "run"
    if prepare is not None:
        prepare(out)
    before = snapshot(tmp_path)
    argv = ["decompose", "a dog", *TINY_ARGS, "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert snapshot(tmp_path) == before


def test_cli_concept_errors(tmp_path, cache, capsys, monkeypatch):
    from conceptor_nb.cli import main

    monkeypatch.setattr(conceptor_nb.cli, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    for concept, fragment in [("  ", "the concept is empty"), ("a {} dog", "without '{' or '}'")]:
        assert main(["decompose", concept, *TINY_ARGS, "--out", str(tmp_path / "o")]) == 2
        assert fragment in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def _cli_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_cache")


@pytest.fixture
def cli_cache(_cli_cache, monkeypatch):
    """One cache for the CLI runs below: the tiny CLIP's vocabulary features are computed once."""
    monkeypatch.setenv("CONCEPTOR_CACHE", str(_cli_cache))
    return _cli_cache


def test_cli_long_concept_default_out_and_rescue(tmp_path, cli_cache, capsys, monkeypatch):
    """A 60-word concept gets a short default folder; a write that fails after the fit saves the result in
    the cache and says where; files get the user's umask."""
    import conceptor_nb.cli as cli

    monkeypatch.chdir(tmp_path)
    concept = " ".join(["red"] * 60)
    old = os.umask(0o022)
    try:
        assert cli.main(["decompose", concept, *TINY_ARGS]) == 0
    finally:
        os.umask(old)
    (run,) = (tmp_path / "runs").iterdir()
    assert len(run.name) <= 48 and sorted(p.name for p in run.iterdir()) == sorted(cli.RUN_FILES)
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in run.iterdir())

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "write_run", disk_full)
    capsys.readouterr()
    assert cli.main(["decompose", "a dog", *TINY_ARGS, "--out", str(tmp_path / "full")]) == 1
    err = capsys.readouterr().err
    (rescued,) = (cli_cache / "rescued").iterdir()
    assert f"saved to {rescued}" in err and Decomposition.load(rescued).concept == "a dog"


def test_cli_full_disk_prints_the_result_and_leaves_nothing_partial(tmp_path, cli_cache, capsys, monkeypatch):
    """Issue 25, item 7: with --out and the cache's rescued/ both full, "the result is lost" and the partial files
    blocked a re-run. Now the decomposition is printed as JSON (tokens, ids, coefficients), the files this run
    created are removed (the same command runs again without --overwrite), and the printed JSON loads as the result."""
    import conceptor_nb.cli as cli
    import conceptor_nb.io as io

    real = io.atomic_write

    def full(path, data):  # the first image fits, nothing after it does
        if Path(path).name in ("reconstruction.png", "coefficients.safetensors", "decomposition.json"):
            raise OSError(28, "No space left on device")
        return real(path, data)

    rescued = list(cli_cache.glob("rescued/*/*"))
    monkeypatch.setattr(io, "atomic_write", full)
    out = tmp_path / "run"
    assert cli.main(["decompose", "a dog", *TINY_ARGS, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    printed = json.loads(next(ln for ln in err.splitlines() if ln.startswith('{"concept"')))
    assert "printed above as JSON" in err and len(printed["tokens"]) == len(printed["coefficients"]) == 8
    assert not [f for f in io.RUN_FILES if (out / f).exists()] and list(cli_cache.glob("rescued/*/*")) == rescued
    from conceptor_nb.checks import check_output_folder

    check_output_folder(out, io.RUN_FILES)  # what refuses a re-run without --overwrite: nothing is left to refuse
    (tmp_path / "printed").mkdir()
    (tmp_path / "printed" / "decomposition.json").write_text(json.dumps(printed))  # as the message says
    back = Decomposition.load(tmp_path / "printed")
    assert back.tokens == printed["tokens"] and back.coefficients == printed["coefficients"] and back.model == "tiny"


def test_the_largest_seed_accepted_gives_image_seeds_torch_takes():
    from conceptor_nb.checks import MAX_SEED, check_seed
    from conceptor_nb.method.generate import OFFSETS, image_seeds

    for split in OFFSETS:  # the last image seed of the largest run seed, in every split
        torch.Generator().manual_seed(image_seeds(check_seed("seed", MAX_SEED), 250_000, split)[-1])
    with pytest.raises(InvalidInputError, match="seed"):
        check_seed("seed", MAX_SEED + 1)
