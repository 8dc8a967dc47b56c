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
# # 03 · Bias: detect it in the decomposition, measure it in the images, mitigate it
#
# **What this teaches:** a decomposition shows which words carry a concept. When those words belong to one value of an
# attribute (a profession decomposed into mostly male words, say), the concept is biased, and the
# coefficients say by how much. We measure the bias two ways, side by side:
#
# 1. **from the decomposition**: each value's share of the top tokens' coefficient mass;
# 2. **from images**: the share of the concept's generated images that a zero-shot CLIP
#    classifier gives each value, with a 95% (Wilson) confidence interval.
#
# In the toy world, "doctor" is drawn as a person, 80% blue and 20% red, and a pixel oracle that
# reads colours gives a third, ground-truth measurement. Then we **mitigate**: raise the
# under-represented value's token in the decomposition, render, measure, and adjust
# (doubling, then bisection) until the rendered share meets the target, while checking that the images still
# show the concept (a doctor must stay a person, whatever its colour).

# %%
from IPython.display import display
import matplotlib.pyplot as plt
import pandas as pd

import conceptor_nb as cn
from conceptor_nb.toyworld import colour_oracle, examples, identity_share

ex = examples()
setup = cn.setup()  # the active profile's model, CLIP and settings
pipe, clip, s = setup.pipe, setup.clip, setup.settings
attribute = ex.bias_attribute
oracle = colour_oracle(list(attribute)) if ex.ground_truth else None
dec = cn.decompose(pipe, f"a {ex.bias_concept}", clip=clip, verbose=False)
display(dec.to_frame(8))

# %% [markdown]
# ## Detect

# %%
report = cn.detect_bias(pipe, dec, attribute, clip=clip, oracle=oracle)
display(report.to_frame())
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
cn.word_picture(dec, k=8, ax=axes[0])
report.plot(ax=axes[1])
cn.save_figure(fig, f"03_{ex.bias_concept}_bias")

# %% [markdown]
# **What to look at:** do the coefficients and the images agree on the majority value? Each group of bars is one
# measure split over the values: the coefficient mass of the top tokens, and the images as CLIP and as the
# oracle read them. An image can be neither blue nor red, so the image shares count only the images that are one of
# the two.

# %% [markdown]
# ## Mitigate
# The target is an equal share for each value. The calibration renders the same seeds after each
# change, so the before/after difference comes from the coefficient alone. In the toy world the
# oracle measures; on Stable Diffusion, the CLIP zero-shot classifier does.
#
# A colour share alone can be met by breaking the concept: raise "red" far enough and the renders become red
# blocks and triangles, not red persons. So on the toy world each round also measures the **identity**, the share
# of renders the oracle still reads as a person; a coefficient that loses more than 0.1 of it counts as too high.
# The `identity` row of the table says what survived. (On Stable Diffusion, pass your own `identity`: images ->
# share, e.g. a CLIP zero-shot check that the images still show a nurse.)

# %%
identity = identity_share(ex.bias_concept) if ex.ground_truth else None
mitigation = cn.mitigate_bias(pipe, dec, attribute, classifier=oracle, identity=identity, clip=clip, n=32,
                              tolerance=0.05)
print("target met:", mitigation.success)
display(mitigation.to_frame())
display(pd.DataFrame(mitigation.rounds))
fig, ax = plt.subplots(figsize=(5, 3.2))
mitigation.plot(ax=ax)
cn.save_figure(fig, f"03_{ex.bias_concept}_mitigation")

# %%
fig, axes = plt.subplots(2, 1, figsize=(8, 2.6))
seeds = mitigation.settings["seeds"][:8]
cn.show_images(dec.render(pipe, seeds), ax=axes[0], nrow=8, title="before")
cn.show_images(mitigation.mitigated.render(pipe, seeds), ax=axes[1], nrow=8,
            title=f"after: {mitigation.token} = {mitigation.coefficient_after:.3g}")
cn.save_figure(fig, f"03_{ex.bias_concept}_before_after")

# %% [markdown]
# ## Try next
# * Another target: `cn.mitigate_bias(pipe, dec, attribute, target={"blue": 0.3, "red": 0.7}, classifier=oracle)`.
# * More images for a tighter interval: `cn.detect_bias(pipe, dec, attribute, n=64)`.
# * On Stable Diffusion (`CONCEPTOR_PROFILE=sd`) the example is "a nurse" with gendered word lists.

# %%
# checks (nbval runs this notebook as a test)
if ex.ground_truth:  # the spec's majority (blue) is found both ways, and mitigation moves red towards its target
    assert report.coefficient_share["blue"] > report.coefficient_share["red"], report.to_frame()
    assert report.oracle_share["blue"] > report.oracle_share["red"], report.to_frame()
    assert report.majority == "blue", report.to_frame()
    assert mitigation.after["red"] > mitigation.before["red"], mitigation.to_frame()
    assert mitigation.identity_after >= mitigation.identity_before - 0.1, mitigation.to_frame()
assert mitigation.before != mitigation.after or mitigation.success, mitigation.to_frame()
