"""Loading diffusion pipelines and CLIP models: real checkpoints, the toy world, a tiny random one.

``load_pipeline("toy")`` loads the shipped toy world, ``load_pipeline("tiny")``
builds a small random SD-shaped pipeline from config (meaningless weights, for
tests), and anything else goes to diffusers' ``from_pretrained`` (a hub id or a
local folder of a Stable Diffusion 1.x/2.x checkpoint).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import data_dir, toy_run_folder
from .tiny import clip_tokenizer
from .errors import ModelNotFoundError

TOY_HINT = (
    "The toy world is not in {path}. Train it with "
    "`python -m conceptor_nb.toyworld.train --spec conceptor_nb/data/toyworld/spec.json --out conceptor_nb/data/toyworld`, "
    "or use --model tiny (random weights) or a Stable Diffusion checkpoint."
)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (checked), else cuda, then mps, then cpu."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} was asked for, but torch sees no CUDA GPU here; use device='cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was asked for, but it is not available here; use device='cpu'")
    return device


def _toy_path(part: str) -> Path:
    path = data_dir() / "toyworld" / part
    if not (path / ("model_index.json" if part == "pipeline" else "config.json")).exists():
        raise ModelNotFoundError(TOY_HINT.format(path=path))
    return path


def _offline(name: str) -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def _root_cause(err: Exception) -> str:
    """The innermost error of a chain, as text: diffusers' own message can say "see the stacktrace above",
    which a caught error does not show."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).replace(" Please check out the root cause in the stacktrace above.", "")
    return f"{type(err).__name__}: {text}"


def _offline_hint(name: str, err: Exception | None = None) -> ModelNotFoundError:
    how = "HF_HUB_OFFLINE is set, so only" if _offline(name) else "Only"
    under = f" Underlying error: {_root_cause(err)}" if err is not None else ""
    return ModelNotFoundError(
        f"could not load model {name!r}: it is not a local folder, and it is not in the local Hugging Face cache "
        f"({_hub_cache()}). {how} checkpoints already in that cache can be used (set HF_HOME to where they are). "
        f"Short names: 'toy' (shipped toy world), 'tiny' (random weights); a single checkpoint file "
        f"(*.safetensors) also works.{under}"
    )


def _hub_cache() -> str:
    """The hub cache folder as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


@contextmanager
def quiet_loading():
    """Silence what loading prints that a user can do nothing about: progress bars, transformers'
    torchvision fallback notice, diffusers' offline-cache notes and deprecation warnings."""
    import warnings

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = (tlog.get_verbosity(), dlog.get_verbosity())
    bars = (tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled())
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*(torch_dtype|deprecated|safety checker).*")
            yield
    finally:
        tlog.set_verbosity(levels[0])
        dlog.set_verbosity(levels[1])
        if bars[0]:
            tlog.enable_progress_bar()
        if bars[1]:
            dlog.enable_progress_bar()


PIPELINES = {"StableDiffusionPipeline": "StableDiffusionPipeline", "StableDiffusionXLPipeline": "StableDiffusionXLPipeline"}
WEIGHT_NAMES = {"diffusers": "diffusion_pytorch_model", "transformers": "model", "stable_diffusion": "model"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def default_dtype(device: torch.device, bf16_supported: bool | None = None) -> torch.dtype:
    """The weights' dtype: float32 on CPU and MPS; bfloat16 on a CUDA GPU that computes it, else float32.

    bf16 rather than fp16 on GPUs: the fit back-propagates the diffusion loss through the whole UNet into
    the pseudo-token, and fp16 gradients of that loss underflow without loss scaling; bf16 has float32's
    range, runs as fast as fp16, and halves memory. The MLP, its optimiser and the loss stay float32.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float32


def _weights(folder: Path, stem: str) -> tuple[bool, bool]:
    """(full-precision weights present, fp16-variant weights present) in a component folder."""
    full = any((folder / f"{stem}{ext}").exists() or (folder / f"{stem}{ext}.index.json").exists()
               for ext in (".safetensors", ".bin"))
    full = full or any(folder.glob(f"{stem}-00001-of-*.safetensors"))
    half = any((folder / f"{stem}.fp16{ext}").exists() or (folder / f"{stem}.fp16{ext}.index.json").exists()
               for ext in (".safetensors", ".bin"))
    half = half or any(folder.glob(f"{stem}.fp16-00001-of-*.safetensors"))
    return full, half


def check_pipeline_folder(folder: Path, what: str) -> tuple[dict, str | None]:
    """model_index.json of a pipeline folder, and the weights variant to load ("fp16" or None).

    Raises ModelNotFoundError naming the missing part and the folder it should be in.
    """
    index_file = folder / "model_index.json"
    if not index_file.exists():
        raise ModelNotFoundError(
            f"{what}: the folder {folder} has no model_index.json, so it is not a diffusers pipeline folder. "
            f"Expected model_index.json with unet/, vae/, text_encoder/, tokenizer/ and scheduler/ next to it "
            f"(what `save_pretrained` writes); for a single checkpoint file pass the file itself."
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelNotFoundError(f"{what}: {index_file} is not valid JSON ({err})") from err
    full_all, half_all = True, True
    for part, spec in index.items():
        if part.startswith("_") or not isinstance(spec, list) or spec[0] is None or part in ("safety_checker", "feature_extractor"):
            continue
        sub = folder / part
        if not sub.is_dir():
            raise ModelNotFoundError(f"{what}: the folder {folder} has no {part}/ (model_index.json lists {part}: {spec[1]})")
        if part.startswith(("tokenizer", "scheduler")):
            continue
        full, half = _weights(sub, WEIGHT_NAMES.get(spec[0], "model"))
        if not (full or half):
            stem = WEIGHT_NAMES.get(spec[0], "model")
            raise ModelNotFoundError(
                f"{what}: {sub} has no weights: expected {stem}.safetensors (or {stem}.fp16.safetensors) in it")
        full_all &= full
        half_all &= half
    return index, (None if full_all else "fp16")


def _resolve_folder(name: str) -> Path | None:
    """A local folder, or the cached snapshot of a hub id (None when the id is not cached)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.count("/") != 1 or path.exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "model_index.json", cache_dir=_hub_cache())
    except Exception:  # an id the hub library refuses (bad characters): not in the cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def load_pipeline(name_or_path: str = "toy", device=None, dtype: torch.dtype | None = None, *, seed: int = 0,
                  config: str | None = None):
    """A Stable Diffusion 1.x/2.x or SDXL diffusers pipeline, ready for Conceptor.

    ``name_or_path``: ``"toy"``, ``"tiny"``, a local pipeline folder, a hub id (from the local
    Hugging Face cache when offline), or a single checkpoint file (``*.safetensors``, loaded with
    diffusers' ``from_single_file``; ``config`` names the pipeline folder or hub id whose config
    files go with it, default: found from the checkpoint's keys among cached repos). ``dtype``
    defaults to :func:`default_dtype`. Weights stored only as the fp16 variant (what
    ``variant="fp16"`` downloads) are found and cast. Every parameter is frozen.
    """
    with quiet_loading():  # the first import of the pipelines prints transformers' torchvision notice
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401

    if not name_or_path or not str(name_or_path).strip():
        raise ValueError("model name is empty: pass 'toy', 'tiny', a folder, a hub id or a .safetensors file")
    device = pick_device(device)
    if dtype is None:
        dtype = default_dtype(device)
    name = str(name_or_path)
    if name == "tiny":
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline(seed=seed)
    elif name == "toy":
        with quiet_loading():  # one tokenizer copy is shipped
            pipe = StableDiffusionPipeline.from_pretrained(_toy_path("pipeline"), **dtype_kw(dtype), safety_checker=None,
                                                           requires_safety_checker=False, tokenizer=clip_tokenizer())
    elif name.lower().endswith(SINGLE_FILE_SUFFIXES) and not Path(name).is_dir():
        pipe = load_single_file(name, dtype, config)
    elif (run := toy_run_folder(name)) is not None:  # a toy world trained by conceptor_nb.toyworld.train
        pipe = _from_pretrained(str(run / "pipeline"), dtype, device,
                                tokenizer=None if (run / "pipeline" / "tokenizer").is_dir() else clip_tokenizer())
    else:
        pipe = _from_pretrained(name, dtype, device)
    return prepare_pipeline(pipe, name, device, dtype)


def _from_pretrained(name: str, dtype: torch.dtype, device: torch.device, tokenizer=None):
    import diffusers

    folder = _resolve_folder(name)
    if folder is None:
        if _offline(name) or Path(name).exists() or name.count("/") != 1:
            raise _offline_hint(name)
        try:  # online: let diffusers download it
            with quiet_loading():
                folder = Path(diffusers.DiffusionPipeline.download(name))
        except Exception as err:
            raise _offline_hint(name, err) from err
    index, variant = check_pipeline_folder(folder, f"model {name!r}")
    if variant is None and dtype in (torch.float16, torch.bfloat16) and _fp16_everywhere(folder, index):
        variant = "fp16"  # half the bytes to read, same values once cast to the target dtype
    cls_name = index.get("_class_name", "")
    if cls_name not in PIPELINES:
        raise ModelNotFoundError(
            f"model {name!r} is a {cls_name or 'pipeline of unknown class'} ({folder / 'model_index.json'}); "
            f"supported: {', '.join(PIPELINES)} (Stable Diffusion 1.x, 2.x and SDXL)")
    cls = getattr(diffusers, PIPELINES[cls_name])
    kw = dict(**dtype_kw(dtype), variant=variant)
    if tokenizer is not None:
        kw["tokenizer"] = tokenizer
    if cls_name == "StableDiffusionPipeline":
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        kw.update(add_watermarker=False)
    try:
        with quiet_loading():
            return cls.from_pretrained(folder, **kw)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelNotFoundError(f"could not load model {name!r} from {folder}: {_root_cause(err)}") from err


def dtype_kw(dtype: torch.dtype) -> dict:
    """``dtype=`` for diffusers that has it (``torch_dtype`` is deprecated there), else ``torch_dtype=``."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


# diffusers' default config repo for a checkpoint type -> other ids of the same files people have cached
CONFIG_ALIASES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("runwayml/stable-diffusion-v1-5",),
    "runwayml/stable-diffusion-v1-5": ("stable-diffusion-v1-5/stable-diffusion-v1-5",),
    "stabilityai/stable-diffusion-2-1": ("stabilityai/stable-diffusion-2-1-base",),
}


def load_single_file(path: str, dtype: torch.dtype, config: str | None = None):
    """A pipeline from one checkpoint file (the original Stable Diffusion layout), with diffusers'
    ``from_single_file``; the component configs come from ``config`` (a pipeline folder or a hub id in the
    local cache), by default from the cached repo diffusers associates with the checkpoint's keys."""
    import diffusers
    from diffusers.loaders.single_file_utils import (DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type,
                                                     is_open_clip_model, is_open_clip_sdxl_model)

    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelNotFoundError(f"checkpoint file {file} does not exist (model={path!r})")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(file))
        except Exception as err:
            raise ModelNotFoundError(f"checkpoint {file} is not a readable safetensors file: {err}") from err
    else:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ModelNotFoundError(
                f"checkpoint {file} could not be read: it is a pickle file and does not load with "
                f"torch.load(weights_only=True) ({type(err).__name__}: {str(err).splitlines()[0][:200]}). Pickles can run "
                f"code, so only plain tensors are accepted: use the model's .safetensors file, or convert this one "
                f"where you trust it.") from err
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not any(k.startswith("model.diffusion_model.") for k in state):
        raise ModelNotFoundError(
            f"checkpoint {file} is not a Stable Diffusion checkpoint in the original single-file layout "
            f"(no model.diffusion_model.* weights); for a diffusers folder pass the folder")
    kind = infer_diffusers_model_type(state)
    if kind == "v1" and is_open_clip_model(state):
        # diffusers tells 2.x by a 1024-wide cross-attention in input_blocks.2.1, which a 2.x model with
        # other widths or one layer per block lacks; its OpenCLIP text encoder (cond_stage_model.model.*) says 2.x
        kind = "v2"
    elif kind == "v1" and is_open_clip_sdxl_model(state):
        # diffusers tells SDXL base by a 10th layer (resblocks.9) in its second text encoder, which one with
        # fewer layers lacks; that encoder itself (conditioner.embedders.1.model.*) says SDXL base
        kind = "xl_base"
    if kind not in ("v1", "v2", "xl_base"):
        raise ModelNotFoundError(
            f"checkpoint {file} is a {kind!r} checkpoint (diffusers' name for it); supported single files: "
            f"Stable Diffusion 1.x ('v1'), 2.x ('v2') and SDXL base ('xl_base')")
    xl = kind == "xl_base"
    if config is None:
        default = DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"]
        candidates = (default,) + CONFIG_ALIASES.get(default, ())
        folder = next((f for f in map(_resolve_folder, candidates) if f is not None), None)
        if folder is None:
            raise ModelNotFoundError(
                f"checkpoint {file} looks like a {kind!r} checkpoint, whose config files are those of "
                f"{' or '.join(candidates)}; none of them is in the Hugging Face cache ({_hub_cache()}). "
                f"Put them there (`huggingface-cli download {candidates[0]} --include '*.json' '*.txt'`, no weights "
                f"needed), or pass config=<a pipeline folder with model_index.json and its subfolders' configs>.")
    else:
        folder = _resolve_folder(config)
        if folder is None:
            raise ModelNotFoundError(
                f"config={config!r} for checkpoint {file} is neither a pipeline folder nor a hub id in the cache "
                f"({_hub_cache()}); pass a folder holding model_index.json and the components' config files")
    cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    index = folder / "model_index.json"
    declared = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if declared in PIPELINES and PIPELINES[declared] != cls.__name__:
        # the file's weights and the configs' pipeline disagree: loading would fail deep inside diffusers
        raise ModelNotFoundError(
            f"checkpoint {file} holds {'an SDXL' if xl else 'a Stable Diffusion 1.x/2.x'} model ({kind!r} by its "
            f"keys), but the configs in {folder} are for a {declared}; pass config=<a pipeline folder or hub id "
            f"of the checkpoint's own kind>")
    kw = dict(add_watermarker=False) if xl else dict(safety_checker=None, requires_safety_checker=False)
    try:
        with quiet_loading():
            return cls.from_single_file(str(file), config=str(folder), local_files_only=True, **dtype_kw(dtype), **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        cause = _root_cause(err)
        if "meta tensor" in cause:  # a weight the configs call for was not in the file: it stayed unallocated
            cause = (f"the file lacks weights that these configs need (an incomplete checkpoint, or configs of "
                     f"another model: pass config=<the right pipeline folder or hub id>) ({cause})")
        raise ModelNotFoundError(f"could not load checkpoint {file} with the configs of {folder}: {cause}") from err


def _fp16_everywhere(folder: Path, index: dict) -> bool:
    for part, spec in index.items():
        if part.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if part.startswith(("tokenizer", "scheduler", "feature_extractor", "safety_checker")):
            continue
        if not _weights(folder / part, WEIGHT_NAMES.get(spec[0], "model"))[1]:
            return False
    return True


def prepare_pipeline(pipe, name: str, device, dtype: torch.dtype):
    """Name, move and freeze a pipeline (eval mode, no gradients, no progress bars) for Conceptor."""
    pipe.conceptor_model = name  # the short name or path it was loaded from ('toy', 'tiny', ...)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.to(device)
    for module in text_encoders(pipe) + [pipe.unet, pipe.vae]:
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_encoders(pipe) -> list:
    """The pipeline's text encoders: one for SD 1.x/2.x, two for SDXL."""
    return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


@dataclass
class Clip:
    """A CLIP model with the few operations Conceptor needs, on image tensors in [0, 1]."""

    model: "torch.nn.Module"
    tokenizer: object
    name: str
    image_size: int
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            # generated images are square: resize == resize-shortest-side + centre crop
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True, align_corners=False)
        dtype = next(self.model.parameters()).dtype
        return ((x - self.mean.to(x.device)[:, None, None]) / self.std.to(x.device)[:, None, None]).to(dtype)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """L2-normalised image embeddings of float images (N, 3, H, W) in [0, 1]."""
        out = []
        for i in range(0, len(images), batch_size):
            f = _features(self.model.get_image_features(pixel_values=self._pixels(images[i : i + batch_size])))
            out.append(F.normalize(f.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_features_ids(self, input_ids: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """L2-normalised text embeddings of already tokenized, equal-length sequences."""
        out = []
        for i in range(0, len(input_ids), batch_size):
            f = _features(self.model.get_text_features(input_ids=input_ids[i : i + batch_size].to(self.device)))
            out.append(F.normalize(f.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").input_ids
        return self.text_features_ids(ids)


def _features(out) -> torch.Tensor:
    # transformers 4.x returns a tensor, 5.x an output whose pooler_output is the projection
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def load_clip(name_or_path: str = "toy", device=None, dtype: torch.dtype | None = None, *, seed: int = 0) -> Clip:
    """A CLIP model for dictionary selection and image scoring.

    ``"toy"`` (shipped with the toy world), ``"tiny"`` (random), a folder or a hub id
    such as ``openai/clip-vit-base-patch32`` (the authors' choice for SD 2.1).
    """
    with quiet_loading():
        from transformers import CLIPModel, CLIPTokenizer

    if not name_or_path or not str(name_or_path).strip():
        raise ValueError("CLIP model name is empty: pass 'toy', 'tiny', a folder or a hub id")
    device = pick_device(device)
    name = str(name_or_path)
    if name == "tiny":
        from .tiny import tiny_clip

        model, tokenizer = tiny_clip(seed=seed)
    else:
        path = _toy_path("clip") if name == "toy" else _resolve_clip_folder(name)
        try:
            with quiet_loading():
                model = CLIPModel.from_pretrained(path)
                tokenizer = clip_tokenizer() if name == "toy" else CLIPTokenizer.from_pretrained(path)
        except (OSError, ValueError, EnvironmentError) as err:
            raise _offline_hint(name, err) from err
    model.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)
    # the resolved folder, not the short name: the toy CLIP's own mean/std are in its preprocessor_config.json
    mean, std, size = _image_norm(path if name != "tiny" else name, model)
    return Clip(model, tokenizer, name, size, torch.tensor(mean), torch.tensor(std))


def _resolve_clip_folder(name: str):
    """A local folder, or the cached snapshot of a hub id (so nothing asks the hub), else the name itself."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(name, "config.json", cache_dir=_hub_cache())
        except Exception:
            found = None
        if isinstance(found, str):
            return Path(found).parent
        if _offline(name):
            raise _offline_hint(name)
    return name


def _image_norm(path, model):
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    size = model.config.vision_config.image_size
    cfg = Path(str(path)) / "preprocessor_config.json"
    if cfg.exists():
        import json

        d = json.loads(cfg.read_text())
        mean, std = d.get("image_mean", mean), d.get("image_std", std)
    return mean, std, size


def model_name(pipe) -> str:
    """The name a pipeline was loaded under ('toy', 'tiny', a folder or hub id)."""
    return str(getattr(pipe, "conceptor_model", None) or getattr(pipe, "name_or_path", None) or type(pipe).__name__)


