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
# # 04 · Manipulation: edit the explanation, change the images
#
# **What this teaches:** a decomposition is a recipe: the pseudo-token is $\sum_i \alpha_i w_i$. Change one coefficient
# and render with the same seeds, and you see what that word contributes (the paper: a sculpture
# made more or less "abstract", a president more or less "trump"). Three tools:
#
# * `dec.with_coefficient(token, value)`: a copy with one coefficient set (0 removes a token; a
#   token that is not in the decomposition is added);
# * `cn.sweep(...)`: an image strip over several values of one coefficient, rendered in one batch,
#   with optional measurements per value;
# * `cn.panel(...)`: sliders for the top coefficients (in Jupyter).

# %%
from IPython.display import display
import matplotlib.pyplot as plt

import conceptor_nb as cn
from conceptor_nb.toyworld import colour_share, examples, identity_share, toy_spec

ex = examples()
setup = cn.setup()  # the active profile's model, CLIP and settings
pipe, clip, s = setup.pipe, setup.clip, setup.settings
dec = cn.decompose(pipe, f"a {ex.manip_concept}", clip=clip, verbose=False)
display(dec.to_frame(8))

# %% [markdown]
# ## Remove the strongest token
# Same seeds, with and without the top token.

# %%
top_token = dec.tokens[0]
seeds = dec.seeds(8)
base = dec.render(pipe, seeds)
without = {t: dec.with_coefficient(t, 0.0).render(pipe, seeds) for t in dec.tokens[:6]}  # each top token removed
fig, axes = plt.subplots(2, 1, figsize=(8, 2.6))
cn.show_images(base, ax=axes[0], nrow=8, title=f'the pseudo-token of "{dec.concept}"')
cn.show_images(without[top_token], ax=axes[1], nrow=8,
            title=f"without '{top_token}'")
cn.save_figure(fig, f"04_{ex.manip_concept}_remove_top")

# %% [markdown]
# ## Which removals change the images: the significance test
# The decomposition carries its own evidence (notebook 01): for each top token, how much the held-out diffusion loss
# rises when the token is removed (`loss_rise`, with its standard error) and whether that rise is more than two
# standard errors (`supported`). Beside it, what removing the token does to the renders at the same seeds
# (`image_change`: the mean absolute pixel change, 0 to 1). Read both. On the toy world they often disagree: a
# leaf's own colour can be unsupported while removing it changes the images most, and a word the leaf never draws
# can be supported. There the test is right about roughly half of the tokens it supports (`docs/method.md`), so
# `supported` is evidence to weigh, not a verdict.

# %%
change = [(images - base).abs().mean().item() for images in without.values()]
evidence = dec.to_frame(6)[["token", "coefficient", "loss_rise", "loss_rise_se", "supported"]].assign(image_change=change)
display(evidence)

# %% [markdown]
# ## Sweep one coefficient
# Each column is one value of the coefficient of `ex.manip_token`, each row one seed. The values
# are multiples of the decomposition's total top-token mass (0 = absent, 1 = as heavy as all the
# other tokens together). In the toy world the pixel oracle measures, at each value, the share of images in that
# colour and the share that still show a leaf's shape (a triangle): an edit can reach its colour by drawing
# something that is no longer a leaf, and the second line says when it does.

# %%
mass = sum(c for _, c in dec.top())
values = [v * mass for v in ex.manip_values]
measure = ({f"{ex.manip_token} share": colour_share(ex.manip_token),
            f"still a {ex.manip_concept}": identity_share(ex.manip_concept)} if ex.ground_truth else None)
sw = cn.sweep(pipe, dec, ex.manip_token, values, seeds=range(16), measure=measure)
display(sw.to_frame())
fig, axes = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1.3, 1]})
sw.plot(ax=axes[0], n_seeds=6)
if measure:
    sw.to_frame().plot(x="value", y=list(measure), marker="o", ax=axes[1])
    axes[1].set(ylabel="share of the 16 images", xlabel=f"coefficient of '{ex.manip_token}'", ylim=(0, 1))
cn.save_figure(fig, f"04_{ex.manip_concept}_sweep_{ex.manip_token}")

# %% [markdown]
# ## The slider panel
# Move a slider and the images re-render (after a short pause, so a drag renders once). Without a
# Jupyter front end (a script, nbval) the panel is built and rendered once, and nothing else happens.

# %%
p = cn.panel(pipe, dec, k=6, seeds=(0, 1, 2, 3))
p

# %% [markdown]
# ## Try next
# * Add a token the decomposition does not have: `dec.with_coefficient("purple", 0.2, tokenizer=pipe.tokenizer)`.
# * Sweep a shape word: `cn.sweep(pipe, dec, "circle", [0, 0.2, 0.5], seeds=range(8))`.
# * On Stable Diffusion the example is the paper's "a sculpture" with "abstract".

# %%
# checks (nbval runs this notebook as a test)
if ex.ground_truth:  # raising the colour's coefficient raises the oracle's share of that colour
    share = sw.scores[f"{ex.manip_token} share"]
    assert all(b >= a - 1 / 16 for a, b in zip(share, share[1:])), share  # monotone, up to one image of 16
    assert share[-1] - share[0] >= 0.25, share
assert sw.images.shape[:2] == (len(ex.manip_values), 16), sw.images.shape
tested = evidence.dropna(subset=["loss_rise"])
assert (tested["supported"].astype(bool) == (tested["loss_rise"] > 2 * tested["loss_rise_se"])).all(), tested
assert evidence["image_change"].iloc[0] > 0, evidence  # removing the strongest token changes the renders
if ex.ground_truth:  # the removal that changes the images most is of a word the concept is made of
    biggest = evidence.loc[evidence["image_change"].idxmax(), "token"]
    assert biggest in toy_spec().concepts[ex.manip_concept].constituents, evidence
before = p.image.value
p.debounce = 0             # re-render at once: a script has no event loop to wait in
p.sliders[0].value = 0.0   # what a user does with the mouse
assert p.current().top(1)[0][0] != top_token and p.image.value != before, "the slider did not re-render the panel"
