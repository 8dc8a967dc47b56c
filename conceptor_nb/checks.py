"""Input checks, called by every public entry point before it generates, fits or writes anything: a bad
value raises InvalidInputError naming the argument, the value and what is accepted. Also the one concept
parser (``parse_concept``), the settings check, external images as tensors (``as_images``) and --out's check."""
from __future__ import annotations

import difflib
import math
import numbers
import tempfile
import warnings
from contextlib import suppress
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import SEED_STRIDE, TEMPLATE, Settings
from .errors import InvalidInputError, OutputError

MAX_SEED = (2**63 - 1) // SEED_STRIDE - 1  # a run's image seeds reach seed * SEED_STRIDE + SEED_STRIDE - 1: all fit int64


def _show(value) -> str:
    return repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."


def bad(name: str, value, accepted: str) -> InvalidInputError:
    """The error for argument ``name``: '<name> must be <accepted>, got <value> (<type>)'."""
    return InvalidInputError(f"{name} must be {accepted}, got {_show(value)} ({type(value).__name__})")


def _number(name, value, kind, lo, hi, lo_open, allow_none):
    if value is None and allow_none:
        return None
    bounds = [f"> {lo}" if lo_open else f">= {lo}"] if lo is not None else []
    bounds += [f"<= {hi}"] if hi is not None else []
    accepted = " ".join([kind, " and ".join(bounds)]).strip() + (" or None" if allow_none else "")
    integer = kind == "an integer"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise bad(name, value, accepted)
    value = int(value) if integer else float(value)
    if (not integer and not math.isfinite(value)) or (lo is not None and (value <= lo if lo_open else value < lo)) \
            or (hi is not None and value > hi):
        raise bad(name, value, accepted)
    return value


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *, allow_none: bool = False):
    """``value`` as an int in [lo, hi]; bools and strings are refused."""
    return _number(name, value, "an integer", lo, hi, False, allow_none)


def check_float(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                allow_none: bool = False):
    """``value`` as a finite float in [lo, hi] (``lo_open``: (lo, hi]); NaN, inf, bools and strings are refused."""
    return _number(name, value, "a finite number", lo, hi, lo_open, allow_none)


def check_seed(name: str, value, *, allow_none: bool = False):
    return check_int(name, value, 0, MAX_SEED, allow_none=allow_none)


def check_seeds(name: str, seeds) -> list[int]:
    """A non-empty sequence of seeds, as a list of ints."""
    seeds = list(seeds) if hasattr(seeds, "__iter__") and not isinstance(seeds, (str, bytes)) else seeds
    if not isinstance(seeds, list) or not seeds:
        raise bad(name, seeds, "a non-empty list of integer seeds")
    return [check_seed(f"{name}[{i}]", s) for i, s in enumerate(seeds)]


def check_choice(name: str, value, choices, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in choices:
        raise bad(name, value, "one of " + ", ".join(map(repr, sorted(choices))) + (" or None" if allow_none else ""))
    return value


def check_template(name: str, value) -> str:
    rest = value.replace("{}", "") if isinstance(value, str) else "{"
    if "{" in rest or "}" in rest or value.count("{}") != 1:
        raise bad(name, value, f"a string with exactly one '{{}}' where the word goes, e.g. {TEMPLATE!r}")
    return value


def check_callable(name: str, value):
    if value is not None and not callable(value):
        raise bad(name, value, "a function of images (e.g. images -> labels) or None")
    return value


def check_token(name: str, value) -> str:
    if not isinstance(value, str) or len(value.split()) != 1:
        raise bad(name, value, "a single word (one vocabulary token), e.g. 'red'")
    return value.strip().lower()


def check_pipe(pipe):
    if not all(hasattr(pipe, a) for a in ("unet", "vae", "text_encoder", "tokenizer")):
        raise bad("pipe", pipe, "a diffusers pipeline from conceptor_nb.load_pipeline(...)")
    return pipe


def parse_concept(concept, template: str = TEMPLATE) -> tuple[str, str]:
    """The one parser of concept strings: ``(word, prompt)``.

    "a dog", "dog" -> ("dog", "a photo of a dog"); "The Dog" -> ("dog", "a photo of a Dog"); a full prompt ("a photo of a dog")
    is kept as the prompt, its word is "dog". Whitespace is collapsed.
    """
    accepted = "a word or a short phrase, e.g. 'a president'"
    if not isinstance(concept, str):
        raise bad("concept", concept, accepted)
    text = " ".join(concept.split())
    if not text:
        raise InvalidInputError(f"the concept is empty (got {_show(concept)}): give {accepted}")
    if "{" in text or "}" in text:
        raise bad("concept", concept, accepted + " without '{' or '}' (the template holds the '{}')")
    prompt, body = None, text
    if text.lower() == "a photo of" or text.lower().startswith("a photo of "):
        prompt, body = text, text[len("a photo of"):].strip()
    for article in ("a ", "an ", "the "):
        if body.lower().startswith(article) and len(body) > len(article):
            body = body[len(article):]
            break
    if not body:
        raise bad("concept", concept, accepted + " (it names no thing)")
    return body.lower(), prompt or check_template("template", template).format(body)


def _templates(name, v):
    if isinstance(v, str) or not hasattr(v, "__iter__") or not list(v):
        raise bad(name, v, "a non-empty list of templates, each with one '{}'")
    return tuple(check_template(f"{name}[{i}]", t) for i, t in enumerate(v))


def _flag(name, v):
    if not isinstance(v, bool):
        raise bad(name, v, "True or False")
    return v


def _ints(lo, hi=None):
    return lambda n, v: check_int(n, v, lo, hi)


def _floats(lo, hi, **kw):
    return lambda n, v: check_float(n, v, lo, hi, **kw)


# what each Settings field accepts (fields with ``choices`` in config are checked against them)
RULES = {
    "template": check_template, "clip_templates": _templates, "flip": _flag, "seed": check_seed,
    "n_train": _ints(1), "n_val": _ints(0), "gen_steps": _ints(1, 1000), "dict_size": _ints(1), "n_tokens": _ints(1),
    "steps": _ints(1), "batch_size": _ints(1), "mlp_hidden": _ints(1), "val_every": _ints(0),
    "val_steps": _ints(1, 1000), "val_patience": _ints(0), "fits": _ints(1, 100), "n_test": _ints(0),
    "test_draws": _ints(1, 10_000),
    "guidance": _floats(0.0, 100.0), "explain_guidance": _floats(0.0, 100.0, allow_none=True),
    "lr": _floats(0.0, 1.0, lo_open=True), "weight_decay": _floats(0.0, 10.0),
    "sparsity": _floats(0.0, 1e6), "min_timestep": _floats(0.0, 0.99),
    "exclude_threshold": _floats(-1.0, 1.0, allow_none=True), "null_threshold": _floats(-1.0, 1.0, allow_none=True),
}


def check_setting_names(names, *, where: str = "decompose()") -> None:
    """Refuse keyword arguments that are not Settings fields, suggesting the closest one."""
    known = [f.name for f in fields(Settings)]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InvalidInputError(f"{where} got an unknown setting {name!r}{hint} Settings fields: {', '.join(known)}")


def validate_settings(s):
    """Check every field of a :class:`~conceptor_nb.config.Settings`; returns it with values normalised
    (numpy integers -> int, template lists -> tuples). Raises InvalidInputError naming the field."""
    if not isinstance(s, Settings):
        raise bad("settings", s, "a conceptor_nb.Settings (e.g. conceptor_nb.settings('toy').replace(steps=100))")
    clean = {}
    for f in fields(s):
        value = getattr(s, f.name)
        if "choices" in f.metadata:
            clean[f.name] = check_choice(f.name, value, f.metadata["choices"])
        elif f.name in RULES:
            clean[f.name] = RULES[f.name](f.name, value)
        else:  # a new Settings field must say what it accepts
            raise NotImplementedError(f"checks.RULES has no rule for Settings.{f.name}")
    changed = {k: v for k, v in clean.items() if v is not getattr(s, k)}
    return s.replace(**changed) if changed else s


def pipeline_resolution(pipe) -> int:
    """The pixel size the pipeline generates (UNet sample size x VAE scale factor)."""
    factor = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(pipe.unet.config.sample_size) * int(factor)


def _stack(name, images, accepted):
    if not images:
        raise bad(name, images, "a non-empty batch of " + accepted)
    if all(isinstance(i, Image.Image) for i in images):
        modes = {i.mode for i in images}
        if modes - {"RGB"}:
            warnings.warn(f"{name}: converted PIL images of mode {sorted(modes)} to RGB", stacklevel=4)
        arrays = [np.asarray(i.convert("RGB")) for i in images]
        if len({a.shape for a in arrays}) > 1:
            raise bad(name, f"{len(arrays)} images of sizes {sorted({a.shape for a in arrays})}", "images of one size")
        return np.stack(arrays)
    if all(isinstance(i, torch.Tensor) for i in images):
        try:
            return torch.stack(list(images))
        except RuntimeError as err:
            raise bad(name, f"{len(images)} tensors", "tensors of one shape") from err
    raise bad(name, images, accepted)


def as_images(images, name: str = "images", size: int | None = None) -> torch.Tensor:
    """External images as a float tensor (N, 3, size, size) in [0, 1].

    Accepts a float tensor or array in [0, 1], a uint8 tensor or array (0-255), a PIL image or a
    list of them; (N, C, H, W), channels-last (N, H, W, C) or one image (H, W, C), (1, H, W) or (H, W). A (3, H, W) or
    (4, H, W) tensor is refused: one RGB(A) image or three (four) grayscale ones? Grayscale is repeated to RGB and
    RGBA loses its alpha (with a warning); other sizes are centre-cropped to square and resized to
    ``size`` (with a warning). Refused: NaN/inf, floats outside [0, 1], other integer types, empty batches.
    """
    accepted = "images: a float tensor in [0, 1] or uint8 tensor (N, 3, H, W), a numpy array or PIL images"
    x = [images] if isinstance(images, Image.Image) else images
    if isinstance(x, (list, tuple)):
        x = _stack(name, x, accepted)
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise bad(name, f"array of dtype {x.dtype}", accepted)
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise bad(name, images, accepted)
    x = x.detach().cpu()
    if x.dim() == 3 and x.shape[0] in (3, 4):
        raise bad(name, f"tensor of shape {tuple(x.shape)}", f"a batch: a ({x.shape[0]}, H, W) tensor is one image or "
                  f"{x.shape[0]} grayscale ones; pass x[None] for one image, x[:, None] for {x.shape[0]} grayscale images")
    x = x[None, None] if x.dim() == 2 else x[None] if x.dim() == 3 else x
    if x.dim() != 4 or min(x.shape) == 0:
        raise bad(name, f"tensor of shape {tuple(x.shape)}", "a non-empty batch (N, 3, H, W) or (N, H, W, 3)")
    if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)  # channels-last
    if x.shape[1] not in (1, 3, 4):
        raise bad(name, f"tensor of shape {tuple(x.shape)}", "1 (gray), 3 (RGB) or 4 (RGBA) channels")
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.dtype.is_floating_point:
        x = x.float()
        if not torch.isfinite(x).all():
            raise bad(name, f"a tensor with {int((~torch.isfinite(x)).sum())} NaN/inf values", "finite values in [0, 1]")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            hint = " (it looks like 0-255: divide by 255 or pass uint8)" if hi > 1.5 and lo >= 0 else \
                " (it looks like [-1, 1]: use (x + 1) / 2)" if lo >= -1 - 1e-3 and hi <= 1 + 1e-3 else ""
            raise bad(name, f"floats in [{lo:.3g}, {hi:.3g}]", "floats in [0, 1]" + hint)
        x = x.clamp(0, 1)
    else:
        raise bad(name, f"a tensor of dtype {x.dtype}", "float in [0, 1] or uint8 in [0, 255]")
    if x.shape[1] != 3:
        gray = x.shape[1] == 1
        warnings.warn(f"{name}: " + ("grayscale images repeated to 3 channels" if gray else
                                     "RGBA images: the alpha channel was dropped"), stacklevel=3)
        x = x.repeat(1, 3, 1, 1) if gray else x[:, :3]
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        h, w = x.shape[-2:]
        warnings.warn(f"{name}: {h}x{w} images centre-cropped to square and resized to the model's {size}x{size}",
                      stacklevel=3)
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = torch.nn.functional.interpolate(x[:, :, top: top + side, left: left + side], size=(size, size),
                                            mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return x.contiguous()


def check_output_folder(folder, files, *, overwrite: bool = False) -> Path:
    """Before any work: ``folder`` can be created and written, and holds none of ``files`` (unless
    ``overwrite``). Leaves no trace: folders it had to create for the test are removed again."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file, not a folder: choose a folder (it is created if missing)")
    existing = [f for f in files if (folder / f).exists()]
    if existing and not overwrite:
        raise OutputError(f"--out {folder} already holds {', '.join(existing)}, which this run would overwrite: "
                          "choose another --out or pass --overwrite")
    created, probe = [], folder
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder, prefix=".conceptor-probe-").close()
    except OSError as err:
        raise OutputError(f"cannot write to --out {folder}: {err.strerror or err}. Choose a writable folder") from err
    finally:
        for path in created:  # deepest first
            with suppress(OSError):
                path.rmdir()
    return folder

