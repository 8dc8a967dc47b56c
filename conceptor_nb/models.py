"""Loading diffusion pipelines: Stable Diffusion 1.x, 2.x and SDXL from a hub id (the local cache when
offline), a diffusers folder or a single checkpoint file; the shipped toy world; a tiny random pipeline for
tests. ``setup()`` loads the active profile's model and CLIP for a notebook."""
from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import diffusers.utils.logging as dlog
import torch
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .clip import TEXT_WIDTH, Clip, clip_for, clip_tokenizer, load_clip, tiny_text_config  # noqa: F401 (clip_for)
from .config import Profile, Settings, resolve, toy_run_folder
from .errors import InvalidInputError, ModelNotFoundError
from .loading import (find_folder, hub_cache, model_name, not_found, offline, pick_device,  # noqa: F401 (model_name)
                      quiet_loading, root_cause, toy_path)

with quiet_loading():  # the first import of the pipelines prints transformers' torchvision notice
    from diffusers import (AutoencoderKL, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from diffusers.loaders.single_file_utils import (DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type,
                                                     is_open_clip_model, is_open_clip_sdxl_model)
    from diffusers.utils import deprecation_utils
    from transformers import CLIPTextModel

PIPELINES = {c.__name__: c for c in (StableDiffusionPipeline, StableDiffusionXLPipeline)}
NO_EXTRAS = {  # what Conceptor does not load: the safety checker and its image processor, the watermarker
    "StableDiffusionPipeline": dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
    "StableDiffusionXLPipeline": dict(add_watermarker=False)}
WEIGHT_NAMES = {"diffusers": "diffusion_pytorch_model", "transformers": "model", "stable_diffusion": "model"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes
RENAME = {"A": ".lora_linear_layer.down.", "B": ".lora_linear_layer.up."}  # peft's LoRA key names -> diffusers'
# diffusers' default config repo for a checkpoint type -> other ids of the same files people have cached
CONFIG_ALIASES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("runwayml/stable-diffusion-v1-5",),
    "runwayml/stable-diffusion-v1-5": ("stable-diffusion-v1-5/stable-diffusion-v1-5",),
    "stabilityai/stable-diffusion-2-1": ("stabilityai/stable-diffusion-2-1-base",),
}


def default_dtype(device: torch.device, bf16_supported: bool | None = None) -> torch.dtype:
    """The weights' dtype: bfloat16 on a CUDA GPU that computes it, else float32 (see docs on precision)."""
    if torch.device(device).type == "cuda" and (torch.cuda.is_bf16_supported() if bf16_supported is None
                                                else bf16_supported):
        return torch.bfloat16
    return torch.float32


def dtype_kw(dtype: torch.dtype) -> dict:
    """``dtype=`` for diffusers that has it (``torch_dtype`` is deprecated there), else ``torch_dtype=``."""
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def _has_weights(folder: Path, stem: str, variant: str = "") -> bool:
    """Whether ``folder`` holds ``stem`` weights (``variant=".fp16"``: the fp16 variant), whole or sharded."""
    return any((folder / f"{stem}{variant}{ext}").exists() or (folder / f"{stem}{variant}{ext}.index.json").exists()
               for ext in (".safetensors", ".bin")) or any(folder.glob(f"{stem}{variant}-00001-of-*.safetensors"))


def check_pipeline_folder(folder: Path, what: str, dtype: torch.dtype) -> tuple[dict, str | None]:
    """model_index.json of a pipeline folder, and the weights variant to load: "fp16" when some part has only
    fp16 weights, or when every part has them and ``dtype`` is half (half the bytes, the same values once
    cast); else None. Raises ModelNotFoundError naming the missing part and its folder."""
    index_file = folder / "model_index.json"
    if not index_file.exists():
        raise ModelNotFoundError(
            f"{what}: the folder {folder} has no model_index.json, so it is not a diffusers pipeline folder. "
            f"Expected model_index.json with unet/, vae/, text_encoder/, tokenizer/ and scheduler/ next to it "
            f"(what `save_pretrained` writes); for a single checkpoint file pass the file itself.")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelNotFoundError(f"{what}: {index_file} is not valid JSON ({err})") from err
    full_all, half_all = True, True
    for part, spec in index.items():
        if part.startswith("_") or not isinstance(spec, list) or spec[0] is None or \
                part in ("safety_checker", "feature_extractor"):
            continue
        if not (folder / part).is_dir():
            raise ModelNotFoundError(f"{what}: the folder {folder} has no {part}/ (model_index.json lists {part}: {spec[1]})")
        if part.startswith(("tokenizer", "scheduler")):
            continue
        stem = WEIGHT_NAMES.get(spec[0], "model")
        full, half = _has_weights(folder / part, stem), _has_weights(folder / part, stem, ".fp16")
        if not (full or half):
            raise ModelNotFoundError(f"{what}: {folder / part} has no weights: expected {stem}.safetensors "
                                     f"(or {stem}.fp16.safetensors) in it")
        full_all &= full
        half_all &= half
    return index, "fp16" if not full_all or (half_all and dtype in (torch.float16, torch.bfloat16)) else None


def load_pipeline(name_or_path: str = "toy", device=None, dtype: torch.dtype | None = None, *, seed: int = 0,
                  config: str | None = None, lora: str | None = None, lora_scale: float = 1.0):
    """A Stable Diffusion 1.x/2.x or SDXL diffusers pipeline, ready for Conceptor (on ``device``, frozen).

    ``name_or_path``: ``"toy"``, ``"tiny"``, a local pipeline folder, a folder the toy-world training wrote,
    a hub id (from the local Hugging Face cache when offline), or a single checkpoint file (``*.safetensors``;
    ``config``: the pipeline folder or hub id whose config files go with it, default: found from the
    checkpoint's keys among cached repos). ``dtype`` defaults to :func:`default_dtype`; weights stored only
    as the fp16 variant are found and cast. ``lora``: a LoRA fused in at ``lora_scale`` (see :func:`apply_lora`).
    """
    if not name_or_path or not str(name_or_path).strip():
        raise InvalidInputError("model name is empty: pass 'toy', 'tiny', a folder, a hub id or a .safetensors file")
    lora_file = None if lora is None else find_lora(lora, lora_scale)  # a missing file is named before any loading
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    name = str(name_or_path)
    if name == "tiny":
        pipe = tiny_pipeline(seed=seed)
    elif name == "toy":
        with quiet_loading():  # one tokenizer copy is shipped
            pipe = StableDiffusionPipeline.from_pretrained(toy_path("pipeline"), tokenizer=clip_tokenizer(),
                                                           **dtype_kw(dtype), **NO_EXTRAS["StableDiffusionPipeline"])
    elif name.lower().endswith(SINGLE_FILE_SUFFIXES) and not Path(name).is_dir():
        pipe = load_single_file(name, dtype, config)
    elif (run := toy_run_folder(name)) is not None:  # a toy world trained by conceptor_nb.toyworld.train
        pipe = _from_pretrained(str(run / "pipeline"), dtype,
                                tokenizer=None if (run / "pipeline" / "tokenizer").is_dir() else clip_tokenizer())
    else:
        pipe = _from_pretrained(name, dtype)
    if lora_file is not None:
        apply_lora(pipe, lora, lora_scale, lora_file, name)
    return prepare_pipeline(pipe, name, device, dtype)


def find_lora(lora, scale) -> Path:
    """The weights file of a LoRA: a ``.safetensors`` file, a folder holding one, or a hub id (the local cache when
    offline); checks ``scale`` too. InvalidInputError / ModelNotFoundError name what is wrong."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise InvalidInputError(f"lora_scale must be a finite number, got {scale!r}")
    if not isinstance(lora, (str, Path)) or not str(lora).strip():
        raise InvalidInputError(f"lora must be a .safetensors file, a folder holding one or a hub id, got {lora!r}")
    path, name = Path(lora).expanduser(), str(lora)
    if path.is_dir():
        files = [path / LORA_FILE] if (path / LORA_FILE).is_file() else sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ModelNotFoundError(f"LoRA folder {path} holds {len(files)} .safetensors files; pass the file itself")
        path = files[0]
    elif not path.exists() and name.count("/") == 1 and not name.endswith(SINGLE_FILE_SUFFIXES):  # a hub id
        folder = find_folder(name, LORA_FILE)
        if folder is None and not offline():
            try:
                folder = Path(hf_hub_download(name, LORA_FILE)).parent
            except Exception as err:
                raise not_found(name, err) from err
        if folder is None:
            raise not_found(name)
        path = folder / LORA_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"LoRA file {path} does not exist (lora={name!r})")
    if path.suffix != ".safetensors":
        raise InvalidInputError(f"LoRA {path}: only .safetensors files are read (a pickle can run code)")
    return path


def apply_lora(pipe, lora, scale: float, file: Path, model: str = "") -> None:
    """Load the LoRA in ``file`` with diffusers' loader (peft), fuse it into the weights at ``scale`` and drop the
    adapter layers. ``pipe.conceptor_lora`` records it (source, SHA-256 of the file, scale): the weights
    fingerprint, and so every cache key, changes with it. One that does not fit the model is refused."""
    try:
        with quiet_loading():  # (which restores the level after) diffusers logs the error raised here
            dlog.set_verbosity(dlog.CRITICAL)
            try:
                pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="conceptor")
            except ValueError as err:  # diffusers reads a text encoder's LoRA format from its attention keys: one of
                if "infer state dict type" not in str(err):  # MLP layers only, in peft's names, loads under its own
                    raise
                pipe.unload_lora_weights()
                with tempfile.TemporaryDirectory() as tmp, safe_open(str(file), "pt") as f:
                    names = {k: re.sub(r"\.lora_([AB])\.", lambda m: RENAME[m[1]], k) if k.startswith("text_encoder")
                             else k for k in f.keys()}  # (the same weights and header, in a temporary copy)
                    save_file({names[k]: f.get_tensor(k) for k in names}, f"{tmp}/{file.name}", metadata=f.metadata())
                    pipe.load_lora_weights(tmp, weight_name=file.name, adapter_name="conceptor")
    except (ValueError, RuntimeError, KeyError, IndexError) as err:  # IndexError: a key matching no layer
        raise InvalidInputError(f"LoRA {file} does not fit model {model!r} (made for another base model?): "
                                f"{' '.join(root_cause(err).split())[:400]}") from err
    if not any(hasattr(m, "lora_A") for part in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
               if part is not None for m in part.modules()):
        raise InvalidInputError(f"LoRA {file} matched no layer of model {model!r}: made for another base model?")
    pipe.fuse_lora(lora_scale=float(scale))
    pipe.unload_lora_weights()
    pipe.conceptor_lora = {"lora": str(lora), "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                           "scale": float(scale)}


def _from_pretrained(name: str, dtype: torch.dtype, tokenizer=None):
    folder = find_folder(name)
    if folder is None:
        if offline() or Path(name).exists() or name.count("/") != 1:
            raise not_found(name)
        try:  # online: let diffusers download it
            with quiet_loading():
                folder = Path(DiffusionPipeline.download(name))
        except Exception as err:
            raise not_found(name, err) from err
    index, variant = check_pipeline_folder(folder, f"model {name!r}", dtype)
    cls_name = index.get("_class_name", "")
    if cls_name not in PIPELINES:
        raise ModelNotFoundError(
            f"model {name!r} is a {cls_name or 'pipeline of unknown class'} ({folder / 'model_index.json'}); "
            f"supported: {', '.join(PIPELINES)} (Stable Diffusion 1.x, 2.x and SDXL)")
    kw = dict(**dtype_kw(dtype), variant=variant, **NO_EXTRAS[cls_name])
    kw.update({"tokenizer": tokenizer} if tokenizer is not None else {})
    try:
        with quiet_loading():
            return PIPELINES[cls_name].from_pretrained(folder, **kw)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"could not load model {name!r} from {folder}: {root_cause(err)}") from err


def _read_checkpoint(file: Path) -> dict:
    """The state dict of a single checkpoint file; pickles only with ``weights_only=True``."""
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except Exception as err:
            raise ModelNotFoundError(f"checkpoint {file} is not a readable safetensors file: {err}") from err
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelNotFoundError(
            f"checkpoint {file} could not be read: it is a pickle file and does not load with "
            f"torch.load(weights_only=True) ({type(err).__name__}: {str(err).splitlines()[0][:200]}). Pickles can run "
            f"code, so only plain tensors are accepted: use the model's .safetensors file, or convert this one "
            f"where you trust it.") from err
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_single_file(path: str, dtype: torch.dtype, config: str | None = None):
    """A pipeline from one checkpoint file (the original Stable Diffusion layout), with diffusers'
    ``from_single_file``; the component configs come from ``config`` (a pipeline folder or a cached hub id),
    by default from the cached repo diffusers associates with the checkpoint's keys."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelNotFoundError(f"checkpoint file {file} does not exist (model={path!r})")
    state = _read_checkpoint(file)
    if not isinstance(state, dict) or not any(k.startswith("model.diffusion_model.") for k in state):
        raise ModelNotFoundError(
            f"checkpoint {file} is not a Stable Diffusion checkpoint in the original single-file layout "
            f"(no model.diffusion_model.* weights); for a diffusers folder pass the folder")
    kind = infer_diffusers_model_type(state)
    # diffusers tells 2.x by a 1024-wide cross-attention and SDXL base by a 10th layer of its second text
    # encoder, which smaller models lack; their text encoders alone say which they are
    if kind == "v1" and is_open_clip_model(state):
        kind = "v2"
    elif kind == "v1" and is_open_clip_sdxl_model(state):
        kind = "xl_base"
    if kind not in ("v1", "v2", "xl_base"):
        raise ModelNotFoundError(
            f"checkpoint {file} is a {kind!r} checkpoint (diffusers' name for it); supported single files: "
            f"Stable Diffusion 1.x ('v1'), 2.x ('v2') and SDXL base ('xl_base')")
    xl = kind == "xl_base"
    if config is None:
        default = DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"]
        candidates = (default,) + CONFIG_ALIASES.get(default, ())
        folder = next((f for f in map(find_folder, candidates) if f is not None), None)
        if folder is None:
            raise ModelNotFoundError(
                f"checkpoint {file} looks like a {kind!r} checkpoint, whose config files are those of "
                f"{' or '.join(candidates)}; none of them is in the Hugging Face cache ({hub_cache()}). "
                f"Put them there (`huggingface-cli download {candidates[0]} --include '*.json' '*.txt'`, no weights "
                f"needed), or pass config=<a pipeline folder with model_index.json and its subfolders' configs>.")
    elif (folder := find_folder(config)) is None:
        raise ModelNotFoundError(
            f"config={config!r} for checkpoint {file} is neither a pipeline folder nor a hub id in the cache "
            f"({hub_cache()}); pass a folder holding model_index.json and the components' config files")
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    index = folder / "model_index.json"
    declared = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if declared in PIPELINES and declared != cls.__name__:  # loading would fail deep inside diffusers
        raise ModelNotFoundError(
            f"checkpoint {file} holds {'an SDXL' if xl else 'a Stable Diffusion 1.x/2.x'} model ({kind!r} by its "
            f"keys), but the configs in {folder} are for a {declared}; pass config=<a pipeline folder or hub id "
            f"of the checkpoint's own kind>")
    try:
        with quiet_loading():
            return cls.from_single_file(str(file), config=str(folder), local_files_only=True, **dtype_kw(dtype),
                                        **NO_EXTRAS[cls.__name__])
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        cause = root_cause(err)
        if "meta tensor" in cause:  # a weight the configs call for was not in the file: it stayed unallocated
            cause = (f"the file lacks weights that these configs need (an incomplete checkpoint, or configs of "
                     f"another model: pass config=<the right pipeline folder or hub id>) ({cause})")
        raise ModelNotFoundError(f"could not load checkpoint {file} with the configs of {folder}: {cause}") from err


def tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """A random SD-shaped pipeline built from config (32 px images, 16 px latents, text width 32): meaningless
    weights, for tests and for trying the command line."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32),
        latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=32,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(tiny_text_config()), tokenizer=clip_tokenizer(), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def prepare_pipeline(pipe, name: str, device, dtype: torch.dtype):
    """Name, move and freeze a pipeline (eval mode, no gradients, no progress bars) for Conceptor."""
    pipe.conceptor_model = name  # the short name or path it was loaded from ('toy', 'tiny', ...)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.to(device)
    for module in pipe.components.values():  # the text encoder(s), the UNet and the VAE
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Setup:
    """What a notebook works with: the profile, its settings, the pipeline and its CLIP."""

    profile: Profile
    settings: Settings
    pipe: StableDiffusionPipeline
    clip: Clip


def setup(model: str | None = None, clip: str | None = None, device=None) -> Setup:
    """Load the active profile's model and CLIP (or ``model``/``clip``, see ``config.resolve``), saying so
    in one line."""
    prof, model, clip = resolve(model, clip)
    s = prof.settings
    print(f"profile {prof.name!r}: model {model!r}, CLIP {clip!r}, {s.n_train} images, dictionary {s.dict_size}, "
          f"{s.steps} steps")
    pipe = load_pipeline(model, device)
    return Setup(prof, s, pipe, load_clip(clip, device=pipe.device))
