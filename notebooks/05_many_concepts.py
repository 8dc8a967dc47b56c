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
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Many concepts
#
# **What this teaches:** decompose a whole list of concepts, look at them side by side, and see which
# concepts the model builds from the same words.
#
# `cn.decompose_many(pipe, concepts, out=...)` runs `decompose` for every concept and writes each one
# to `out/<slug>/` exactly as `conceptor decompose` does (the decomposition, its coefficients, the
# concept images and their reconstructions). It is **resumable**: a concept whose folder already
# holds a decomposition with the same settings is skipped, so running a cell again, or the command
# after a crash, continues where it stopped. It returns the summary table it also writes to
# `out/summary.csv` and `summary.json`.
#
# From a terminal the same is `conceptor batch concepts.txt --out runs/`, and on several GPUs
# `accelerate launch -m conceptor_nb batch concepts.txt --out runs/` (each rank takes its share of
# the list). `conceptor report runs/` makes an offline HTML gallery of the results.
#
# On the toy world we decompose all six hidden concepts; the spec says what each is made of.

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from IPython.display import display

import conceptor_nb as cn
from conceptor_nb.toyworld import examples, score_decomposition, toy_spec

ex = examples()
setup = cn.setup()  # the active profile's model, CLIP and settings
pipe, clip, s = setup.pipe, setup.clip, setup.settings

if ex.ground_truth:
    spec = toy_spec()
    concepts = [f"a {c}" for c in spec.concept_words]
else:
    concepts = [f"a {c}" for c in ex.concepts]
out = cn.cache_dir() / "batch" / f"{setup.profile.name}-{cn.settings_hash(s)}"  # one folder per set of settings
concepts

# %% [markdown]
# ## The batch
# One progress bar over the concepts. The table has one row per concept: its status, the top
# tokens with their coefficients, timings, and the UNet evaluations it cost.

# %%
summary = cn.decompose_many(pipe, concepts, out, clip=clip)
cols = ["concept", "status", "token_1", "coef_1", "token_2", "coef_2", "token_3", "coef_3", "best_step", "wall_s", "unet_total"]
display(summary[cols].round(3))

# %% [markdown]
# Running it again does nothing new: every concept is done with these settings. `load_runs`
# reads a finished batch back (here, and in any later session).

# %%
starts = sum(e["event"] == "start" for e in cn.read_log(out))
again = cn.decompose_many(pipe, concepts, out, clip=clip, verbose=False)
restarted = sum(e["event"] == "start" for e in cn.read_log(out)) - starts
back = cn.load_runs(out)
print(f"concepts started again: {restarted}; read back: {len(back)} concepts, {(back['status'] == 'done').sum()} done")

# %% [markdown]
# ## Concepts x tokens
# Every concept's five strongest tokens, and each concept's coefficient for each of them
# (0 where the token is not in that concept's dictionary).

# %%
decs = cn.load_decompositions(out)
decs = {c: decs[c] for c in concepts}
matrix = cn.token_matrix(decs, k=5)
fig, ax = plt.subplots(figsize=(1 + 0.45 * matrix.shape[1], 1 + 0.5 * len(concepts)))
sns.heatmap(matrix, cmap="viridis", ax=ax, cbar_kws={"label": "coefficient"})
ax.set_xlabel("token")
ax.set_ylabel("concept")
ax.set_title("coefficients of every concept's top-5 tokens")
cn.save_figure(fig, "05_concept_token_heatmap")
plt.show()

# %% [markdown]
# ## Shared words
# Tokens in the top 10 of more than one concept: the words the model reuses across concepts.

# %%
top10 = {c.removeprefix("a "): [t for t, _ in d.top(10)] for c, d in decs.items()}
users: dict[str, list[str]] = {}
for c, toks in top10.items():
    for t in toks:
        users.setdefault(t, []).append(c)
shared = pd.DataFrame([{"token": t, "concepts": ", ".join(cs), "n": len(cs)} for t, cs in users.items() if len(cs) > 1])
shared = shared.sort_values(["n", "token"], ascending=[False, True]).reset_index(drop=True) if len(shared) else shared
display(shared)

# %% [markdown]
# ## Against the spec (toy world only)
# The share of each concept's constituents (from the spec) found in its top 10.

# %%
if ex.ground_truth:
    scores = pd.DataFrame([{"concept": c, "found": ", ".join(sc.found), "missing": ", ".join(sc.missing), "recall@10": sc.recall_at_k}
                           for c, d in decs.items() for sc in [score_decomposition(d, spec, k=10)]])
    display(scores)

# %% [markdown]
# ## The gallery
# `build_report` (or `conceptor report <out>`) writes one offline HTML file: a sortable index and,
# per concept, the word picture, the top-10 table, and the concept images above their
# reconstructions.

# %%
page = cn.build_report(out)
print(page)

# %% [markdown]
# ## Try next
# * Your own list: a text file with one concept a line, `conceptor batch my_concepts.txt --out runs/`.
# * Other settings per concept: a CSV with a `concept` column and one column per setting (docs/batch.md).
# * Open the gallery in a browser: `page` above is one self-contained HTML file.

# %%
# checks (nbval runs this notebook as a test)
assert restarted == 0, "a finished concept was decomposed again"
assert list(back["concept"]) == concepts and (back["status"] == "done").all(), back
assert list(back["token_1"]) == list(summary["token_1"]), (back, summary)
for c, d in decs.items():  # every concept's heatmap row peaks at its own strongest token
    row = matrix.loc[c]
    assert row.idxmax() == d.tokens[0] or row.max() == row[d.tokens[0]], (c, row.sort_values().tail(3))
    assert (row >= 0).all(), (c, row[row < 0])
if ex.ground_truth:
    assert scores["recall@10"].mean() >= 0.5, scores
assert page.exists() and all(f'data-concept="{c}"' in page.read_text() for c in concepts), f"the gallery {page} misses a concept"
