# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
# ---

# %% [markdown]
# # 06 · Comparing models: what did a LoRA change about a concept?
#
# **What this teaches:** you fine-tuned a model, or loaded a LoRA from a model-sharing site. What did it change about
# *a doctor*?
#
# This notebook teaches three things:
#
# 1. **An adapter on the explained model.** `cn.load_pipeline(model, lora=path)` applies a LoRA with diffusers'
#    own loader and fuses it in; the LoRA and its scale become part of the model's identity (the image cache
#    never mixes the two models' images).
# 2. **Comparing two decompositions.** Decompose the same concept on the base model and with the LoRA, then
#    `cn.compare(base, tuned)`: the union of their top tokens, each side's share of its top-token mass, the
#    difference, and a diverging bar plot. (It also compares two concepts on one model.)
# 3. **Taking an explanation elsewhere.** `dec.save_embedding(path, pipe)` writes the pseudo-token as a
#    textual-inversion file; any diffusers pipeline loads it with `load_textual_inversion` and draws exactly the
#    images `dec.render` draws.
#
# On the **toy world** the answer is known. Its doctor is drawn as a person, 80% blue and 20% red. The shipped
# LoRA `doctor_red_lora.safetensors` (trained by `scripts/toyworld_lora.py`, a few minutes on a CPU) draws
# doctors as red persons and leaves the world's other captions nearly as they were. The pixel oracle confirms what
# the images show; what the decomposition says about it is below, with its limits. On Stable Diffusion (`CONCEPTOR_PROFILE=sd`), set `CONCEPTOR_LORA` to a LoRA
# file for your model. Without one, the notebook compares two concepts on one model instead.

# %%
import copy
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import display

import conceptor_nb as cn
from conceptor_nb.toyworld import colour_oracle, examples, shipped_lora

ex = examples()
setup = cn.setup()  # the active profile's model, CLIP and settings
pipe, clip, s = setup.pipe, setup.clip, setup.settings
model = setup.profile.model
LORA = os.environ.get("CONCEPTOR_LORA") or (shipped_lora() if ex.ground_truth else None)
concept = "a doctor" if ex.ground_truth else f"a {ex.bias_concept}"
print("LoRA:", LORA or "none: two concepts on one model instead")

# %% [markdown]
# ## The same concept on two models
# `decompose` runs the whole method on each model. The LoRA'd pipeline is a second, independent pipeline; the
# base one stays as it was.

# %%
dec_base = cn.decompose(pipe, concept, clip=clip, verbose=False)
if LORA:
    tuned = cn.load_pipeline(model, lora=LORA)
    print("the tuned model records its LoRA:", tuned.conceptor_lora)
    dec_b, labels = cn.decompose(tuned, concept, clip=clip, verbose=False), ("base", "LoRA")
else:  # no adapter: a second concept on the same model
    tuned = pipe
    dec_b, labels = cn.decompose(pipe, f"a {ex.concepts[0]}", clip=clip, verbose=False), None
display(cn.decomposition_table([dec_base, dec_b], k=5))

# %% [markdown]
# What the two models draw for the prompt (the images each fit learned from):

# %%
n = 8
fig, axes = plt.subplots(2, 1, figsize=(8, 2.6))
cn.show_images(dec_base.concept_images(pipe, n), ax=axes[0], nrow=n, title=f'"{dec_base.prompt}", base')
cn.show_images(dec_b.concept_images(tuned, n), ax=axes[1], nrow=n,
               title=f'"{dec_b.prompt}", ' + ("with the LoRA" if LORA else "same model"))
cn.save_figure(fig, "06_concept_images")

# %% [markdown]
# ## Compare
# Coefficients have no common scale across fits (each fit rescales its pseudo-token), so `compare` puts each
# token as a *share* of its side's top-token mass. `diff` is the second side minus the first. With error bars
# on both sides (`fits=3`, see notebook 01), `exceeds_spread` says whether a difference is larger than the fits'
# own spread; with one fit each it is empty.
#
# **Read one fit's differences with care.** On the toy world, with the toy profile and three seeds, *blue* fell in
# all three and *red* rose in two, but in every seed some other world word (a shape, another colour, *person*)
# moved by as much: one fit's noise is as large as this LoRA's effect on the coefficients
# (`tests/test_lora_groundtruth.py` records the numbers). Error bars (`fits=3`) are the way to tell them apart.

# %%
cmp = cn.compare(dec_base, dec_b, labels=labels)
table = cmp.to_frame()
display(table)
fig, ax = plt.subplots(figsize=(6, 0.3 * len(table) + 1.4))
cmp.plot(ax=ax)
cn.save_figure(fig, "06_compare")

# %% [markdown]
# On the toy world the pixel oracle reads what each model's images show, so we can check the comparison against
# what really changed: the share of red and of blue persons among the concept images.

# %%
if ex.ground_truth:
    classify = colour_oracle()
    shares = {}
    for name, d, p in (("base", dec_base, pipe), ("LoRA", dec_b, tuned)):
        colours = classify(d.concept_images(p))
        shares[name] = {c: sum(x == c for x in colours) / len(colours) for c in ("red", "blue")}
    display(shares)

# %% [markdown]
# ## The pseudo-token in plain diffusers
# `save_embedding` writes the base decomposition's pseudo-token (rescaled as the fit used it) in the
# textual-inversion format: one tensor named after the token. A diffusers pipeline loads it with
# `load_textual_inversion` and is prompted with the template around the token. Same seeds, same steps, guidance
# and sampler: the same images as `dec.render`.

# %%
out = Path(tempfile.mkdtemp()) / "doctor.safetensors"
path = dec_base.save_embedding(out, pipe, token="<doctor>")
plain = copy.deepcopy(pipe)  # stands for any diffusers pipeline of this model; the session's stays untouched
plain.load_textual_inversion(str(path))
if s.sampler:
    plain.scheduler = cn.SCHEDULERS[s.sampler].from_config(plain.scheduler.config)
seeds = dec_base.seeds(4)
prompt = s.template.format("<doctor>")
plain_images = plain([prompt] * len(seeds), num_inference_steps=s.gen_steps, guidance_scale=s.guidance,
                     generator=[torch.Generator("cpu").manual_seed(x) for x in seeds],
                     output_type="pt").images.float().clamp(0, 1)
renders = dec_base.render(pipe, seeds)
fig, axes = plt.subplots(2, 1, figsize=(4, 2.6))
cn.show_images(renders, ax=axes[0], nrow=len(seeds), title="dec.render")
cn.show_images(plain_images, ax=axes[1], nrow=len(seeds), title=f'plain diffusers, "{prompt}"')
cn.save_figure(fig, "06_textual_inversion")
print("largest pixel difference:", (plain_images - renders.cpu()).abs().max().item())

# %% [markdown]
# ## Try next
# * Error bars on the comparison: `cn.decompose(pipe, concept, fits=3)` on both sides, then `cn.compare`:
#   `exceeds_spread` marks the differences larger than the fits' spread.
# * Two concepts on one model: `cn.compare(cn.decompose(pipe, "a doctor"), cn.decompose(pipe, "a person"))`.
# * A weaker LoRA: `cn.load_pipeline(model, lora=LORA, lora_scale=0.5)`.
# * The command line: `conceptor export RUN_DIR --embedding doctor.safetensors`, and `--lora` on any command
#   that loads a model.
# * Retrain the toy LoRA, e.g. to turn fruit into lemons: `python scripts/toyworld_lora.py --help`.

# %%
# checks
assert list(table["diff"]) == sorted(table["diff"], reverse=True) and len(table) >= max(dec_base.n_tokens, 1), table
assert torch.equal(plain_images, renders.cpu()), "the exported embedding must draw exactly the renders"
if LORA and ex.ground_truth:  # what the images show changed as the LoRA was trained to change it
    assert shares["LoRA"]["red"] > shares["base"]["red"] and shares["LoRA"]["blue"] < shares["base"]["blue"], shares
    assert shares["LoRA"]["red"] >= 0.5, shares
