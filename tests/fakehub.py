"""Fake Hugging Face hub caches: the real repos' config files with random weights.

``build(hf_home, repos)`` writes ``hf_home/hub/models--ORG--NAME/refs/main`` and
``snapshots/<rev>/...`` as ``huggingface_hub`` lays them out, for

* runwayml/stable-diffusion-v1-5          (CLIP ViT-L text encoder, safety checker)
* stabilityai/stable-diffusion-2-1-base   (OpenCLIP-H text encoder, pad "!", epsilon, 512 px)
* stabilityai/stable-diffusion-2-1        (768 px, v-prediction)
* stabilityai/stable-diffusion-xl-base-1.0 (two text encoders, "text_time" conditioning, 1024 px)
* openai/clip-vit-base-patch32            (the dictionary CLIP)

The config files are the real ones (``tests/fixtures/hub_configs``; SDXL's were
written from the published repo, the shared folder has none). ``shrink=True``
changes only layer widths and depths (channels, attention heads, layers per block,
group-norm groups, text widths, SDXL's time-embedding width; every key stays, and
the sample sizes, tokenizers, schedulers and prediction types are the real ones),
so that a decomposition runs in seconds to a minute on a CPU; ``shrink=False`` keeps the real shapes (gigabytes: slow tests only).
Where the real repo has fp16 variants (``*.fp16.safetensors``) they are written
too; ``variants=("fp16",)`` makes a cache that holds only those, as
``from_pretrained(..., variant="fp16")`` downloads it.

Also a command: ``python tests/fakehub.py HF_HOME [--full] [--repo ORG/NAME ...]``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hub_configs"
TOKENIZER_FILES = Path(__file__).resolve().parents[1] / "conceptor_nb" / "data" / "clip_tokenizer"

SD15 = "runwayml/stable-diffusion-v1-5"
SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
SD21 = "stabilityai/stable-diffusion-2-1"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
CLIP_B32 = "openai/clip-vit-base-patch32"
PIPELINES = (SD15, SD21_BASE, SD21, SDXL)
ALL = PIPELINES + (CLIP_B32,)
FP16_REPOS = set(PIPELINES)  # the CLIP repo has no fp16 variant

# shrunk widths of the text encoders (te_2 is SDXL's second one)
TEXT = {"text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                             projection_dim=32),
        "text_encoder_2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                               projection_dim=64)}
CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, projection_dim=16)
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, projection_dim=16)


def revision(repo: str) -> str:
    return hashlib.sha1(f"fake:{repo}".encode()).hexdigest()


def repo_folder(hf_home, repo: str) -> Path:
    return Path(hf_home) / "hub" / ("models--" + repo.replace("/", "--"))


def snapshot(hf_home, repo: str) -> Path:
    return repo_folder(hf_home, repo) / "snapshots" / revision(repo)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_json(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=2) + "\n")


def _shrunk_unet(cfg: dict, text_width: int, pooled_width: int | None) -> dict:
    n = len(cfg["block_out_channels"])
    new = dict(block_out_channels=[16] * n, layers_per_block=1, cross_attention_dim=text_width, norm_num_groups=8)
    head = cfg.get("attention_head_dim")
    new["attention_head_dim"] = [2] * n if isinstance(head, list) else 2
    if isinstance(cfg.get("transformer_layers_per_block"), list):
        new["transformer_layers_per_block"] = [min(2, t) for t in cfg["transformer_layers_per_block"]]
    if cfg.get("addition_embed_type") == "text_time":
        new["addition_time_embed_dim"] = 8
        new["projection_class_embeddings_input_dim"] = pooled_width + 6 * 8  # pooled text + 6 size/crop numbers
    return new


def _shrunk_vae(cfg: dict) -> dict:
    return dict(block_out_channels=[8] * len(cfg["block_out_channels"]), layers_per_block=1, norm_num_groups=4)


def _save(model, folder: Path, cfg: dict, variants, config_name="config.json") -> None:
    """Weights (one file per variant) and the real config with the shrunk values."""
    folder.mkdir(parents=True, exist_ok=True)
    for v in variants:
        m = model if v == "fp32" else copy.deepcopy(model).half()
        m.save_pretrained(folder, safe_serialization=True, **({} if v == "fp32" else {"variant": v}))
    _write_json(folder / config_name, cfg)  # save_pretrained wrote its own: put the real keys back


def _tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.json"):
        shutil.copy(f, dst / f.name)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_FILES / f, dst / f)


def _text_encoder(name: str, src: Path, dst: Path, shrink: bool, variants) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = _json(src / "config.json")
    if shrink:
        cfg.update(TEXT[name])
    keys = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    cls = CLIPTextModelWithProjection if cfg["architectures"][0] == "CLIPTextModelWithProjection" else CLIPTextModel
    model = cls(CLIPTextConfig(**keys))
    _save(model, dst, cfg, variants)
    return cfg


def _version(v: str) -> tuple:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def _pipeline(repo: str, snap: Path, shrink: bool, variants, sample_size: int | None = None) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    src = FIXTURES / repo
    index = _json(src / "model_index.json")
    shutil.copy(src / "model_index.json", snap / "model_index.json")
    widths = {}
    for name in ("text_encoder", "text_encoder_2"):
        if name in index:
            widths[name] = _text_encoder(name, src / name, snap / name, shrink, variants)
    for name in ("tokenizer", "tokenizer_2"):
        if name in index:
            _tokenizer(src / name, snap / name)
    for name in ("scheduler", "feature_extractor"):
        if name in index and (src / name).exists():
            shutil.copytree(src / name, snap / name, dirs_exist_ok=True)
    cfg = _json(src / "unet" / "config.json")
    if shrink:
        text_width = sum(c["hidden_size"] for c in widths.values())
        pooled = widths.get("text_encoder_2", {}).get("projection_dim")
        cfg.update(_shrunk_unet(cfg, text_width, pooled))
    if sample_size is not None:  # smaller images than the real repo's (behaviour tests, not shape tests)
        cfg["sample_size"] = sample_size
        # diffusers raises the sample_size of an SD 1.x config written before diffusers 0.9 to 64: say it is newer
        cfg["_diffusers_version"] = max(cfg.get("_diffusers_version", "0.9.0"), "0.9.0", key=_version)
    unet = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    _save(unet, snap / "unet", cfg, variants)
    cfg = _json(src / "vae" / "config.json")
    if shrink:
        cfg.update(_shrunk_vae(cfg))
    vae = AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    _save(vae, snap / "vae", cfg, variants)
    if index.get("safety_checker", [None])[0] is not None:
        _safety_checker(src / "safety_checker", snap / "safety_checker", shrink, variants)


def _clip_config_keys(cfg: dict, shrink: bool) -> dict:
    """A CLIP config's keys for ``CLIPConfig(**keys)``; ``shrink``: smaller towers (in ``cfg`` too, which is saved)."""
    if shrink:
        cfg["vision_config"].update(CLIP_VISION)
        cfg["text_config"].update(CLIP_TEXT)
        cfg["projection_dim"] = 16
    return {k: v for k, v in cfg.items() if not k.startswith("_") and not k.endswith("_dict")
            and k not in ("architectures", "transformers_version")}


def _safety_checker(src: Path, dst: Path, shrink: bool, variants) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    cfg = _json(src / "config.json")
    model = StableDiffusionSafetyChecker(CLIPConfig(**_clip_config_keys(cfg, shrink)))
    _save(model, dst, cfg, variants)


def _clip(repo: str, snap: Path, shrink: bool) -> None:
    from transformers import CLIPConfig, CLIPModel

    src = FIXTURES / repo
    for f in src.glob("*.json"):
        shutil.copy(f, snap / f.name)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_FILES / f, snap / f)
    cfg = _json(src / "config.json")
    model = CLIPModel(CLIPConfig(**_clip_config_keys(cfg, shrink)))
    _save(model, snap, cfg, ("fp32",))


def build(hf_home, repos=ALL, *, shrink: bool = True, variants=("fp32", "fp16"), seed: int = 0,
          sample_size: int | None = None) -> Path:
    """Write the fake cache of ``repos`` under ``hf_home/hub``; returns ``hf_home``.

    ``variants``: which weight files to write where the real repo has them: "fp32"
    (``model.safetensors``) and/or "fp16" (``model.fp16.safetensors``). ``sample_size``: the UNet's
    latent size instead of the real one (16: 128 px images, as diffusers' own pipeline tests do; an SD 1.x
    config is then marked as written by diffusers 0.9, else diffusers raises its sample_size to 64).
    """
    torch.manual_seed(seed)
    for repo in ([repos] if isinstance(repos, str) else repos):
        if repo not in ALL:
            raise ValueError(f"no fixture configs for {repo!r}; known: {ALL}")
        folder = repo_folder(hf_home, repo)
        snap = snapshot(hf_home, repo)
        if snap.exists():
            shutil.rmtree(snap)
        snap.mkdir(parents=True)
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(revision(repo))
        if repo == CLIP_B32:
            _clip(repo, snap, shrink)
        else:
            _pipeline(repo, snap, shrink, variants if repo in FP16_REPOS else ("fp32",), sample_size)
    return Path(hf_home)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="write fake hub caches (real configs, random weights)")
    p.add_argument("hf_home")
    p.add_argument("--repo", action="append", help=f"one of {ALL} (default: all)")
    p.add_argument("--full", action="store_true", help="the real layer shapes (gigabytes)")
    p.add_argument("--fp16-only", action="store_true", help="only the fp16 variant files")
    a = p.parse_args()
    build(a.hf_home, a.repo or ALL, shrink=not a.full, variants=("fp16",) if a.fp16_only else ("fp32", "fp16"))
    print(f"export HF_HOME={a.hf_home} HF_HUB_OFFLINE=1", file=sys.stderr)
