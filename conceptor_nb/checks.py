"""Checking inputs at the boundary, before any model is loaded or any file is written.

Every public entry point (the CLI, ``decompose``, the applications, ``Decomposition.load``)
calls these first. A bad value raises :class:`~conceptor_nb.errors.InvalidInputError`
whose message names the argument, the value it got and what is accepted.

Also here: the one parser of concept strings (``parse_concept``), the settings check
(``validate_settings``), the conversion of external images (``as_images``) and the
output-folder check (``check_output_folder``).
"""
from __future__ import annotations

import difflib
import hashlib
import math
import numbers
import os
import re
import warnings
from dataclasses import fields
from pathlib import Path

from .errors import InvalidInputError, OutputError

MAX_SEED = 2**62  # seeds are used as seed, seed + 1, ... and seed + 1_000_000 + i; all must fit torch's int64


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def bad(name: str, value, accepted: str) -> InvalidInputError:
    """The error for argument ``name``: '<name> must be <accepted>, got <value> (<type>)'."""
    return InvalidInputError(f"{name} must be {accepted}, got {_show(value)} ({type(value).__name__})")


# -- numbers -------------------------------------------------------------------------------------
def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *, allow_none: bool = False):
    """``value`` as an int in [lo, hi]; bools and strings are refused."""
    if value is None and allow_none:
        return None
    lo_txt = "" if lo is None else f" >= {lo}"
    hi_txt = "" if hi is None else (f" and <= {hi}" if lo is not None else f" <= {hi}")
    accepted = f"an integer{lo_txt}{hi_txt}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise bad(name, value, accepted)
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(name, value, accepted)
    return value


def check_float(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                allow_none: bool = False):
    """``value`` as a finite float in [lo, hi] (``lo_open``: (lo, hi]); NaN, inf, bools and strings are refused."""
    if value is None and allow_none:
        return None
    parts = []
    if lo is not None:
        parts.append(f"> {lo}" if lo_open else f">= {lo}")
    if hi is not None:
        parts.append(f"<= {hi}")
    accepted = "a finite number" + (" " + " and ".join(parts) if parts else "") + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise bad(name, value, accepted)
    value = float(value)
    if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) \
            or (hi is not None and value > hi):
        raise bad(name, value, accepted)
    return value


def check_seed(name: str, value, *, allow_none: bool = False):
    return check_int(name, value, 0, MAX_SEED, allow_none=allow_none)


def check_seeds(name: str, seeds) -> list[int]:
    """A non-empty sequence of seeds, as a list of ints."""
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise bad(name, seeds, "a non-empty list of integer seeds")
    seeds = list(seeds)
    if not seeds:
        raise bad(name, seeds, "a non-empty list of integer seeds")
    return [check_seed(f"{name}[{i}]", s) for i, s in enumerate(seeds)]


def check_choice(name: str, value, choices, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in choices:
        raise bad(name, value, "one of " + ", ".join(repr(c) for c in sorted(choices)) + (" or None" if allow_none else ""))
    return value


def check_template(name: str, value) -> str:
    if not isinstance(value, str) or value.count("{}") != 1 or value.replace("{}", "").count("{") \
            or value.replace("{}", "").count("}"):
        raise bad(name, value, "a string with exactly one '{}' where the word goes, e.g. 'a photo of a {}'")
    return value


def check_callable(name: str, value, *, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if not callable(value):
        raise bad(name, value, "a function (images -> labels)" + (" or None" if allow_none else ""))
    return value


def check_token(name: str, value) -> str:
    if not isinstance(value, str) or not value.strip() or len(value.split()) != 1:
        raise bad(name, value, "a single word (one vocabulary token), e.g. 'red'")
    return value.strip().lower()


# -- concepts ------------------------------------------------------------------------------------
PROMPT_PREFIX = "a photo of"
ARTICLES = ("a ", "an ", "the ")


def parse_concept(concept, template: str = "a photo of a {}") -> tuple[str, str]:
    """The one parser of concept strings: ``(word, prompt)``.

    "a dog", "dog", "The Dog" -> ("dog", "a photo of a dog"); a full prompt ("a photo of a dog")
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
    low = text.lower()
    prompt = None
    body = text
    if low.startswith(PROMPT_PREFIX + " ") or low == PROMPT_PREFIX:
        prompt, body = text, text[len(PROMPT_PREFIX):].strip()
    for article in ARTICLES:
        if body.lower().startswith(article) and len(body) > len(article):
            body = body[len(article):]
            break
    if not body:
        raise bad("concept", concept, accepted + " (it names no thing)")
    return body.lower(), prompt or check_template("template", template).format(body)


def concept_prompt(concept, template: str = "a photo of a {}") -> str:
    """"a dog", "dog" -> "a photo of a dog"; a full prompt ("a photo of ...") is kept."""
    return parse_concept(concept, template)[1]


def concept_word(concept) -> str:
    """The concept's words without the template or a leading article: "a photo of a dog" -> "dog"."""
    return parse_concept(concept)[0]


def folder_name(concept, max_len: int = 48) -> str:
    """A file-system-safe folder name for ``concept``: its slug, truncated with a short hash when long."""
    text = concept if isinstance(concept, str) else str(concept)
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "concept"
    if len(slug) <= max_len:
        return slug
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return slug[: max_len - 9].rstrip("-") + "-" + digest


# -- settings ------------------------------------------------------------------------------------
from .config import AUTOCAST, SAMPLERS, VOCAB_PRECISIONS  # noqa: E402


def _rules():
    """field -> checker(name, value) -> value. One place for what each setting accepts."""
    def pos(name, v):
        return check_int(name, v, 1)

    def nonneg(name, v):
        return check_int(name, v, 0)

    def templates(name, v):
        if isinstance(v, str) or not hasattr(v, "__iter__") or not list(v):
            raise bad(name, v, "a non-empty list of templates, each with one '{}'")
        return tuple(check_template(f"{name}[{i}]", t) for i, t in enumerate(v))

    def threshold(name, v):
        return check_float(name, v, -1.0, 1.0, allow_none=True)

    def flag(name, v):
        if not isinstance(v, bool):
            raise bad(name, v, "True or False")
        return v

    return {
        "template": check_template,
        "n_train": pos, "n_val": nonneg, "gen_steps": lambda n, v: check_int(n, v, 1, 1000),
        "guidance": lambda n, v: check_float(n, v, 0.0, 100.0),
        "sampler": lambda n, v: check_choice(n, v, SAMPLERS),
        "dict_size": pos, "clip_templates": templates, "exclude_threshold": threshold, "null_threshold": threshold,
        "n_tokens": pos, "steps": pos, "batch_size": pos,
        "lr": lambda n, v: check_float(n, v, 0.0, 1.0, lo_open=True),
        "weight_decay": lambda n, v: check_float(n, v, 0.0, 10.0),
        "sparsity": lambda n, v: check_float(n, v, 0.0, 1e6),
        "min_timestep": lambda n, v: check_float(n, v, 0.0, 0.99),
        "mlp_hidden": pos, "flip": flag,
        "val_every": nonneg, "val_steps": lambda n, v: check_int(n, v, 1, 1000),
        "val_sampler": lambda n, v: check_choice(n, v, SAMPLERS), "val_patience": nonneg,
        "autocast": lambda n, v: check_choice(n, v, AUTOCAST),
        "vocab_precision": lambda n, v: check_choice(n, v, VOCAB_PRECISIONS),
        "seed": check_seed,
    }


def check_setting_names(names, *, where: str = "decompose()") -> None:
    """Refuse keyword arguments that are not Settings fields, suggesting the closest one."""
    from .config import Settings

    known = [f.name for f in fields(Settings)]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InvalidInputError(f"{where} got an unknown setting {name!r}{hint} Settings fields: {', '.join(known)}")


def validate_settings(s):
    """Check every field of a :class:`~conceptor_nb.config.Settings`; returns it with values normalised
    (numpy integers -> int, template lists -> tuples). Raises InvalidInputError naming the field."""
    from .config import Settings

    if not isinstance(s, Settings):
        raise bad("settings", s, "a conceptor_nb.Settings (e.g. conceptor_nb.settings('toy').replace(steps=100))")
    rules = _rules()
    clean = {}
    for f in fields(s):
        if f.name not in rules:  # a new Settings field must say what it accepts
            raise NotImplementedError(f"checks._rules() has no rule for Settings.{f.name}")
        clean[f.name] = rules[f.name](f.name, getattr(s, f.name))
    changed = {k: v for k, v in clean.items() if v is not getattr(s, k)}
    return s.replace(**changed) if changed else s


# -- images --------------------------------------------------------------------------------------
def pipeline_resolution(pipe) -> int:
    """The pixel size the pipeline generates (UNet sample size x VAE scale factor)."""
    factor = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(pipe.unet.config.sample_size) * int(factor)


def as_images(images, name: str = "images", size: int | None = None):
    """External images as a float tensor (N, 3, size, size) in [0, 1].

    Accepts a float tensor or array in [0, 1], a uint8 tensor or array (0-255), a PIL image or a
    list of them; (N, C, H, W), (C, H, W) or channels-last (N, H, W, C). Grayscale is repeated to RGB and
    RGBA loses its alpha (with a warning); other sizes are centre-cropped to square and resized to
    ``size`` (with a warning). Refused: NaN/inf, floats outside [0, 1] (0-255 passed as floats),
    other integer types, empty batches.
    """
    import numpy as np
    import torch

    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    accepted = "images: a float tensor in [0, 1] or uint8 tensor (N, 3, H, W), a numpy array or PIL images"
    x = images
    if Image is not None and isinstance(x, Image.Image):
        x = [x]
    if isinstance(x, (list, tuple)):
        if not x:
            raise bad(name, images, "a non-empty batch of " + accepted)
        if Image is not None and all(isinstance(i, Image.Image) for i in x):
            modes = {i.mode for i in x}
            if modes - {"RGB"}:
                warnings.warn(f"{name}: converted PIL images of mode {sorted(modes)} to RGB", stacklevel=3)
            x = [np.asarray(i.convert("RGB")) for i in x]
            if len({a.shape for a in x}) > 1:
                raise bad(name, f"{len(x)} images of sizes {sorted({a.shape for a in x})}", "images of one size")
            x = np.stack(x)
        elif all(isinstance(i, torch.Tensor) for i in x):
            try:
                x = torch.stack(list(x))
            except RuntimeError as err:
                raise bad(name, f"{len(x)} tensors", "tensors of one shape") from err
        else:
            raise bad(name, images, accepted)
    if isinstance(x, np.ndarray):
        if x.dtype == object or x.dtype.kind not in "biuf":
            raise bad(name, f"array of dtype {x.dtype}", accepted)
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise bad(name, images, accepted)
    x = x.detach().cpu()
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] == 0 or min(x.shape) == 0:
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
    if x.shape[1] == 1:
        warnings.warn(f"{name}: grayscale images repeated to 3 channels", stacklevel=3)
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] == 4:
        warnings.warn(f"{name}: RGBA images: the alpha channel was dropped", stacklevel=3)
        x = x[:, :3]
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        h, w = x.shape[-2:]
        warnings.warn(f"{name}: {h}x{w} images centre-cropped to square and resized to the model's {size}x{size}",
                      stacklevel=3)
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, :, top: top + side, left: left + side]
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                                            align_corners=False).clamp(0, 1)
    return x.contiguous()


# -- results -------------------------------------------------------------------------------------
def check_decomposition(name: str, dec):
    from .conceptor import Decomposition

    if not isinstance(dec, Decomposition):
        raise bad(name, dec, "a conceptor_nb.Decomposition (from decompose() or Decomposition.load(folder))")
    return dec


def check_pipe(pipe):
    if not all(hasattr(pipe, a) for a in ("unet", "vae", "text_encoder", "tokenizer")):
        raise bad("pipe", pipe, "a diffusers pipeline from conceptor_nb.load_pipeline(...)")
    return pipe


# -- output folders ------------------------------------------------------------------------------
def check_output_folder(folder, files, *, overwrite: bool = False) -> Path:
    """Before any work: ``folder`` can be created and written, and holds none of ``files`` (unless
    ``overwrite``). Leaves no trace: folders it had to create for the test are removed again."""
    import tempfile

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file, not a folder: choose a folder (it is created if missing)")
    existing = [f for f in files if (folder / f).exists()]
    if existing and not overwrite:
        raise OutputError(f"--out {folder} already holds {', '.join(existing)}, which this run would overwrite: "
                          "choose another --out or pass --overwrite")
    created = []
    probe = folder
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".conceptor-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise OutputError(f"cannot write to --out {folder}: {err.strerror or err}. Choose a writable folder") from err
    finally:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                pass
    return folder
