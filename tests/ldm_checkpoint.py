"""Test-only: a diffusers Stable Diffusion 1.x/2.x or SDXL base pipeline as one checkpoint in the original key layout.

``ldm_state_dict(pipe)`` returns the single-file state dict that the original Stable Diffusion code
(CompVis / Stability "ldm", and Stability's "sgm" for SDXL) writes and model sites share:

* ``model.diffusion_model.*``   the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``;
                                  SDXL's ``add_embedding`` is ``label_emb.0``)
* ``first_stage_model.*``        the VAE (``encoder.down.{i}.block.{j}``, 1x1-conv mid attention)
* ``cond_stage_model.transformer.text_model.*``  SD 1.x: the Hugging Face CLIP text model as is
* ``cond_stage_model.model.*``   SD 2.x: OpenCLIP (``transformer.resblocks``, fused ``in_proj``)
* ``conditioner.embedders.0.transformer.text_model.*``  SDXL's first text encoder (CLIP-L, as SD 1.x's)
* ``conditioner.embedders.1.model.*``  SDXL's second one (OpenCLIP bigG, as SD 2.x's, with its
                                         ``text_projection`` and ``logit_scale``)

Only the inverse of what diffusers' ``from_single_file`` reads back is implemented: no EMA weights,
no SDXL refiner, no inpainting. It is written from the LDM/sgm module layout, not from a conversion script.
``save_ldm_checkpoint(pipe, file)`` writes it with safetensors (no pickle).
"""
from __future__ import annotations

import torch

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}


def _split(key: str, n: int) -> tuple[list[str], str]:
    parts = key.split(".")
    return parts[:n], ".".join(parts[n:])


def _rename(rest: str, table: dict) -> str:
    """``rest`` = ``<module>.<param>``: the module renamed through ``table`` (whole dotted prefixes only)."""
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
    """UNet2DConditionModel weights -> ``openaimodel.UNetModel`` names (without ``model.diffusion_model.``).

    Down block ``b`` holds input blocks ``1 + b*(L+1) .. 1 + b*(L+1) + L``: L x [ResBlock, SpatialTransformer?],
    then the Downsample (``.0.op``). Up block ``b`` holds output blocks ``b*(L+2) ..``: L+1 x [ResBlock,
    SpatialTransformer?], the Upsample after the last one (``.1.conv`` or, after attention, ``.2.conv``).
    """
    L = layers_per_block
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             # SDXL: the pooled text + size/crop embedding is openaimodel's ``label_emb`` (Sequential(Sequential(
             # Linear, SiLU, Linear))); its sinusoidal ``add_time_proj`` has no weights
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    up_attention = {k.split(".")[1] for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, value in state.items():
        if not key.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
            module, param = key.rsplit(".", 1)
            if module not in fixed:
                raise KeyError(f"no LDM name for UNet weight {key}")
            out[f"{fixed[module]}.{param}"] = value
            continue
        if key.startswith("mid_block."):
            (_, kind, i), rest = _split(key, 3)
            if kind == "resnets":
                out[f"middle_block.{2 * int(i)}.{_rename(rest, UNET_RESNET)}"] = value
            else:  # the one transformer sits between the two resnets
                out[f"middle_block.1.{rest}"] = value
            continue
        (where, b, kind, i), rest = _split(key, 4)
        b, i = int(b), int(i)
        if where == "down_blocks":
            first = 1 + b * (L + 1)
            if kind == "resnets":
                out[f"input_blocks.{first + i}.0.{_rename(rest, UNET_RESNET)}"] = value
            elif kind == "attentions":
                out[f"input_blocks.{first + i}.1.{rest}"] = value
            else:  # downsamplers.0.conv.*
                out[f"input_blocks.{first + L}.0.op.{rest.split('.', 1)[1]}"] = value
        else:
            first = b * (L + 1)  # each up block has L + 1 layers
            if kind == "resnets":
                out[f"output_blocks.{first + i}.0.{_rename(rest, UNET_RESNET)}"] = value
            elif kind == "attentions":
                out[f"output_blocks.{first + i}.1.{rest}"] = value
            else:  # upsamplers.0.conv.*
                slot = 2 if str(b) in up_attention else 1
                out[f"output_blocks.{first + L}.{slot}.conv.{rest.split('.', 1)[1]}"] = value
    return out


def vae_to_ldm(state: dict, n_blocks: int) -> dict:
    """AutoencoderKL weights -> ``ldm.modules.diffusionmodules.model`` Encoder/Decoder names (without
    ``first_stage_model.``). The decoder's up blocks are numbered from the lowest resolution in diffusers,
    from the highest in LDM; the mid attention is a 1x1 convolution there."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
            coder, blocks, b, kind, i, rest = parts[0], parts[1], int(parts[2]), parts[3], parts[4], parts[5:]
            level = b if blocks == "down_blocks" else n_blocks - 1 - b
            name = "down" if blocks == "down_blocks" else "up"
            if kind == "resnets":
                rest = ["nin_shortcut" if r == "conv_shortcut" else r for r in rest]
                new = ".".join([coder, name, str(level), "block", i] + rest)
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = ".".join([coder, name, str(level), "downsample" if name == "down" else "upsample"] + rest)
        elif len(parts) > 2 and parts[1] == "mid_block":
            coder, kind, i, rest = parts[0], parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"{coder}.mid.block_{i + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{coder}.mid.attn_1.{_rename(rest, VAE_ATTENTION)}"
                if rest.endswith("weight") and value.ndim == 2 and not rest.startswith("group_norm"):
                    value = value[:, :, None, None]  # Linear -> Conv2d(1x1)
        out[new] = value
    return out


def clip_to_ldm(state: dict) -> dict:
    """transformers' CLIPTextModel weights -> the SD 1.x ``FrozenCLIPEmbedder`` (it holds the same
    CLIPTextModel, so ``text_model.*`` under ``transformer.``); transformers >= 5.6 drops ``text_model.``."""
    return {"transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def openclip_to_ldm(state: dict) -> dict:
    """transformers' CLIPTextModel weights (SD 2.x: the OpenCLIP-H text tower without its last layer) or
    CLIPTextModelWithProjection weights (SDXL: OpenCLIP bigG) -> the ``open_clip`` names of
    ``FrozenOpenCLIPEmbedder`` (SD 2.x) / ``FrozenOpenCLIPEmbedder2`` (SDXL): fused q/k/v ``in_proj``,
    ``ln_final``, ``positional_embedding`` and ``text_projection``, open_clip's (width x projection)
    matrix that multiplies from the right, so the transpose of the Linear weight; SD 2.x does not use it
    and has none in diffusers: a zero width x width one is written."""
    out = {}
    qkv: dict[tuple[str, str], dict] = {}
    for key, value in state.items():
        k = key.removeprefix("text_model.")
        if k == "text_projection.weight":
            out["text_projection"] = value.T
        elif k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".", 1)[1]] = value
        elif k.startswith("encoder.layers."):
            (_, _, i), rest = _split(k, 3)
            module, param = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, param), {})[module[-6]] = value
            else:
                out[f"transformer.resblocks.{i}.{_rename(rest, OPENCLIP_LAYER)}"] = value
        elif k == "embeddings.position_ids":
            continue  # a buffer, not in open_clip
        else:
            raise KeyError(f"no OpenCLIP name for text-encoder weight {key}")
    for (i, param), parts in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if "text_projection" not in out:
        width = out["positional_embedding"].shape[-1]
        out["text_projection"] = torch.zeros(width, width, dtype=out["positional_embedding"].dtype)
    return out


def ldm_state_dict(pipe) -> dict:
    """The whole pipeline (UNet, VAE, text encoder(s)) as one original-layout state dict."""
    unet = {f"model.diffusion_model.{k}": v for k, v in
            unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block).items()}
    vae = {f"first_stage_model.{k}": v for k, v in
           vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)).items()}
    te_state = pipe.text_encoder.state_dict()
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL base: sgm's GeneralConditioner
        bigg = openclip_to_ldm(pipe.text_encoder_2.state_dict())
        # open_clip's learned CLIP temperature (initialised at log(1/0.07)): sgm keeps open_clip's whole
        # text model, so real files have it; nothing reads it back
        bigg["logit_scale"] = torch.tensor(4.6052, dtype=bigg["positional_embedding"].dtype)
        te = {**{f"conditioner.embedders.0.{k}": v for k, v in clip_to_ldm(te_state).items()},
              **{f"conditioner.embedders.1.model.{k}": v for k, v in bigg.items()}}
    elif pipe.text_encoder.config.hidden_act == "gelu":  # SD 2.x OpenCLIP: gelu; OpenAI CLIP: quick_gelu
        te = {f"cond_stage_model.model.{k}": v for k, v in openclip_to_ldm(te_state).items()}
    else:
        te = {f"cond_stage_model.{k}": v for k, v in clip_to_ldm(te_state).items()}
    state = {**unet, **vae, **te}
    assert len(state) == len(unet) + len(vae) + len(te), "two weights got the same LDM name"
    return state


def save_ldm_checkpoint(pipe, file) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in ldm_state_dict(pipe).items()}, str(file))
