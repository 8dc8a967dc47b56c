"""What the toy model draws and how the fit's loss sees it: plain-word and guidance tables, CLIP ranks of
the constituents, the token table's norms, null tests of stray tokens, the fit's loss per noise level,
and the paired check of a missed constituent."""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..config import TEMPLATE
from ..method.dictionary import clean_token
from ..method.fit import combine, diffusion_loss, encode_latents, vocab_norm
from ..method.inject import template_prompt, token_embeddings, tokenize
from ..method.vocab import vocab_text_features
from .metrics import (fidelity_of, generated_share, images_of, mixture_proportions, satisfies, spec_and_oracle,
                      toy_settings)
from .oracle import Oracle
from .spec import Spec


def word_accuracy(pipe, spec: Spec | None = None, words: list[str] | None = None, n: int = 32, seed: int = 0,
                  *, oracle: Oracle | None = None, **gen_kw) -> dict:
    """{prompt words: share of generated images the oracle classifies as the prompt says}.

    ``words``: single words or space-separated phrases ("red circle"); default every colour,
    shape and object word of the spec, each in the spec's template ("a photo of a red").
    """
    spec, oracle = spec_and_oracle(spec, oracle)
    words = words or spec.colour_words + spec.shape_words + spec.object_words
    out = {}
    for w in words:
        parts = w.split()
        share = generated_share(pipe, spec.prompt(*parts), n, seed, spec=spec, oracle=oracle, **gen_kw)
        out[w] = float(np.mean([satisfies(r, spec, parts) for r in share["readings"]]))
    return out


def word_fidelity(pipe, spec: Spec | None = None, guidances=(1.0,), n: int = 32, seed: int = 0, *,
                  oracle: Oracle | None = None, steps: int | None = None, sampler: str | None = None, log=None) -> dict:
    """How faithfully the model draws the world's plain words, per guidance scale:
    ``{guidance: {"n": n, "words": {word: share}, "pairs": {"red circle": {"both": .., "colour": .., "glyph": ..}}}}``.

    ``words``: every colour, shape and object word alone, the share of images that show it; ``pairs``: every
    colour with every shape, the share that show both, the colour, the shape. A model that draws its hidden
    concepts unfaithfully at some scale usually draws plain words badly there too. ``steps``, ``sampler``: the
    toy profile's unless given."""
    spec, oracle = spec_and_oracle(spec, oracle)
    steps, sampler = steps or toy_settings().gen_steps, sampler or toy_settings().sampler
    out = {}
    for g in guidances:
        kw = dict(steps=steps, guidance=float(g), sampler=sampler)
        words = word_accuracy(pipe, spec, spec.colour_words + spec.shape_words + spec.object_words, n, seed,
                              oracle=oracle, **kw)
        pairs = {}
        for c in spec.colour_words:
            for sh in spec.shape_words:
                rd = generated_share(pipe, spec.prompt(c, sh), n, seed, spec=spec, oracle=oracle, **kw)["readings"]
                glyph = [r.glyph == spec.glyph_of(sh) for r in rd]
                colour = [r.colour == c for r in rd]
                pairs[f"{c} {sh}"] = {"both": float(np.mean([a and b for a, b in zip(glyph, colour)])),
                                      "colour": float(np.mean(colour)), "glyph": float(np.mean(glyph))}
        out[str(float(g))] = {"n": n, "words": words, "pairs": pairs}
        if log:
            log(f"guidance {g:g}: plain words {np.mean(list(words.values())):.0%}, colour-shape pairs "
                f"{np.mean([v['both'] for v in pairs.values()]):.0%}")
    return out


def guidance_table(pipe, spec: Spec | str | None = None, guidances=(1.0, 2.0, 4.0, 7.5), n: int = 128, seed: int = 0,
                   *, oracle: Oracle | None = None, steps: int | None = None, sampler: str | None = None,
                   log=None) -> dict:
    """{guidance: {concept: MixtureResult.as_dict()}}: what the model draws for each hidden concept at
    each guidance scale (same seeds for every scale), judged by the oracle. ``steps``, ``sampler``: the toy
    profile's unless given."""
    spec, oracle = spec_and_oracle(spec, oracle)
    steps, sampler = steps or toy_settings().gen_steps, sampler or toy_settings().sampler
    out = {}
    for g in guidances:
        out[float(g)] = {}
        for c in spec.concept_words:
            m = mixture_proportions(pipe, spec, c, n, seed, oracle=oracle, steps=steps, guidance=float(g), sampler=sampler)
            out[float(g)][c] = m.as_dict()
            if log:
                log(f"guidance {g:g} {c}: " + ", ".join(f"{k} {v:.0%}" for k, v in m.generated.items()))
    return out


def model_fidelity(pipe, spec: Spec, settings, guidances=(1.0, 2.0, 4.0, 7.5), n: int = 128, word_n: int = 32, *,
                   oracle: Oracle | None = None, log=None) -> dict:
    """What the model draws with the profile's sampler and steps (``settings``): the guidance table of the hidden
    concepts (``n`` images each; what the unresolved ones show; target 4's verdict when the profile's guidance is
    among ``guidances``) and :func:`word_fidelity` at guidance 1 and the profile's (``word_n`` images per prompt;
    0: skip). Without decompositions: the quick check of a retrained model (``evaluate --fidelity``)."""
    spec, oracle = spec_and_oracle(spec, oracle)
    s, out = settings, {}
    if guidances:
        table = guidance_table(pipe, spec, guidances, n, 0, oracle=oracle, steps=s.gen_steps, sampler=s.sampler, log=log)
        out["guidance_table"] = {str(g): {c: r["generated"] for c, r in rows.items()} for g, rows in table.items()}
        out["guidance_other"] = {str(g): {c: r["other"] for c, r in rows.items()} for g, rows in table.items()}
        if float(s.guidance) in [float(g) for g in guidances]:
            out["fidelity"] = fidelity_of(out["guidance_table"], spec, float(s.guidance))
    if word_n:
        out["word_fidelity"] = word_fidelity(pipe, spec, sorted({1.0, float(s.guidance)}), word_n, 0, oracle=oracle,
                                             steps=s.gen_steps, sampler=s.sampler, log=log)
    return out


# --------------------------------------------------------------------------- CLIP and the token table
@torch.no_grad()
def clip_constituent_ranks(clip, spec: Spec, images: torch.Tensor, concept: str, vocab_features=None,
                           template: str | None = None) -> dict:
    """Rank (1 = best, among all non-special tokens) of the concept word and each constituent when tokens are
    scored by cosine with the mean CLIP image embedding of ``images`` (the dictionary filter Conceptor relies on)."""
    feats = vocab_features if vocab_features is not None else \
        vocab_text_features(clip, (template or spec.template,), cache_dir=False, verbose=False)
    target = torch.nn.functional.normalize(clip.image_features(images).mean(0), dim=0).cpu()
    score = feats.cpu() @ target
    score[[clip.tokenizer.bos_token_id, clip.tokenizer.eos_token_id]] = -float("inf")
    order = torch.argsort(score, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    tok = clip.tokenizer
    r = lambda word: int(rank[tok(word, add_special_tokens=False).input_ids[0]])
    top = [clean_token(tok.convert_ids_to_tokens(int(i))) for i in order[:20]]
    return {"concept": concept, "concept_rank": r(concept),
            "constituent_ranks": {w: r(w) for w in spec.concepts[concept].constituents}, "top20": top}


def vocab_norms(text_encoder, spec: Spec, tokenizer) -> dict:
    """Mean row norm of the whole token table vs the mean norm of the world's words (Conceptor rescales its
    pseudo-token to the whole-table mean, so the two must be comparable)."""
    norms = text_encoder.get_input_embeddings().weight.detach().float().norm(dim=-1)
    ids = [tokenizer(x, add_special_tokens=False).input_ids[0] for x in spec.world_words]
    return {"mean_norm_all": norms.mean().item(), "mean_norm_world": norms[ids].mean().item(),
            "ratio_all_over_world": (norms.mean() / norms[ids].mean()).item(),
            "min_world": norms[ids].min().item(), "max_world": norms[ids].max().item()}


@torch.no_grad()
def null_test(pipe, spec: Spec, token: str, n: int = 32, seed: int = 0, *, oracle: Oracle | None = None, **gen_kw) -> dict:
    """Is ``token`` meaningless to the model? Render "a photo of a <token>" and the empty template "a photo of a"
    with the same seeds; report the total-variation distance between the oracle's (colour, glyph) readings of
    the two sets and the mean pixel distance of same-seed pairs (0, 0: the token changes nothing)."""
    spec, oracle = spec_and_oracle(spec, oracle)
    a = images_of(pipe, spec.template.format(token), n, seed, **gen_kw)
    b = images_of(pipe, spec.template.format("").strip(), n, seed, **gen_kw)
    ra, rb = Counter(f"{r.colour} {r.glyph}" for r in oracle(a)), Counter(f"{r.colour} {r.glyph}" for r in oracle(b))
    tv = 0.5 * sum(abs(ra[k] - rb[k]) for k in set(ra) | set(rb)) / n
    return {"token": token, "tv_distance_to_empty": tv, "pixel_distance_to_empty": float((a - b).abs().mean()),
            "token_readings": dict(ra.most_common(4)), "empty_readings": dict(rb.most_common(4))}


# --------------------------------------------------------------------------- the fit's loss
def _loss_inputs(pipe, images: torch.Tensor, template: str):
    """What the fit's loss needs, once per image set: (alphas_cumprod, number of timesteps, prediction type,
    latents of ``images``, the template's token ids)."""
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    return (sched.alphas_cumprod, sched.config.num_train_timesteps, sched.config.prediction_type,
            encode_latents(pipe.vae, images).float(), tokenize(pipe.tokenizer, template_prompt(template)))


@torch.no_grad()
def loss_by_timestep(pipe, images: torch.Tensor, vectors: dict, *, template: str = TEMPLATE, bins: int = 10,
                     repeats: int = 20, seed: int = 123) -> dict:
    """The fit's reconstruction loss (the diffusion loss, epsilon or v) on ``images`` with each pseudo-token of
    ``vectors`` (``{name: vector}``) in ``template``, per band of noise levels: ``{name: {"bands": [mean loss of
    band 0 (t near 0), ...], "all": the mean over uniform t, what the fit minimises}}``.
    Every vector sees the same noise and timesteps (``repeats`` draws per image)."""
    ac, n_t, prediction, lat, ids = _loss_inputs(pipe, images, template)
    gen = torch.Generator().manual_seed(seed)
    draws = [(torch.randn(lat.shape, generator=gen), torch.randint(0, n_t, (len(lat),), generator=gen)) for _ in range(repeats)]
    out = {}
    for name, w in vectors.items():
        per, cnt, total = torch.zeros(bins), torch.zeros(bins), 0.0
        for noise, tt in draws:
            loss = diffusion_loss(pipe, w, lat, noise, tt, ids, template, prediction, ac, reduction="none")
            band = (tt * bins // n_t).clamp(max=bins - 1)
            per.index_add_(0, band, loss)
            cnt.index_add_(0, band, torch.ones_like(loss))
            total += float(loss.mean())
        out[name] = {"bands": (per / cnt.clamp_min(1)).tolist(), "all": total / repeats}
    return out


@torch.no_grad()
def paired_loss(pipe, images: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, template: str = TEMPLATE,
                min_timestep: float = 0.0, repeats: int = 20, seed: int = 321) -> dict:
    """The fit's reconstruction loss on ``images`` with pseudo-token ``a`` and with ``b``, on the same noise and
    timesteps (t uniform on ``[min_timestep, 1)`` of the schedule): both means, and the mean and standard error
    of the per-sample difference ``b - a`` (paired, so far tighter than either mean)."""
    ac, n_t, prediction, lat, ids = _loss_inputs(pipe, images, template)
    gen = torch.Generator().manual_seed(seed)
    la, lb = [], []
    for _ in range(repeats):
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(int(min_timestep * n_t), n_t, (len(lat),), generator=gen)
        for w, acc in ((a, la), (b, lb)):
            acc.append(diffusion_loss(pipe, w, lat, noise, t, ids, template, prediction, ac, reduction="none"))
    la, lb = torch.cat(la), torch.cat(lb)
    d = lb - la
    return {"a": float(la.mean()), "b": float(lb.mean()), "diff": float(d.mean()),
            "diff_se": float(d.std() / len(d) ** 0.5), "samples": len(d)}


def miss_check(pipe, dec, images: torch.Tensor, word: str, *, k: int = 5, repeats: int = 20) -> dict:
    """Why did a drawn constituent miss the top ``k``: the optimiser, or the objective? Compares the fit's
    pseudo-token (its top ``n_tokens``) with the same pseudo-token where ``word`` gets the ``k``-th largest
    coefficient (swapped with the token that held it; added with that coefficient if it was outside the top
    ``n_tokens``), under the fit's own loss on the run's concept images (its noise range, paired noise).
    ``verdict``: ``"fit"`` when the promoted pseudo-token reconstructs the images worse by more than two standard
    errors (the miss is the objective's, on this model), ``"promoted"`` when it reconstructs them better by as
    much (the optimiser missed it), else ``"indifferent"``."""
    words = [clean_token(x) for x in dec.tokens]
    if word not in words:
        return {"word": word, "in_dictionary": False}
    j, n = words.index(word), dec.n_tokens
    ids, coef = list(dec.token_ids[:n]), [float(c) for c in dec.coefficients[:n]]
    promoted_ids, promoted = list(ids), list(coef)
    if j < n:
        promoted[j], promoted[k - 1] = coef[k - 1], coef[j]
    else:
        promoted_ids.append(dec.token_ids[j])
        promoted.append(coef[k - 1])
    promoted_vector = combine(torch.tensor(promoted, dtype=torch.float32), token_embeddings(pipe, promoted_ids), dec.norm)
    r = paired_loss(pipe, images, dec.vector(pipe), promoted_vector, template=dec.template,
                    min_timestep=dec.settings.min_timestep, repeats=repeats)
    return {"word": word, "in_dictionary": True, "rank": j + 1, "coefficient": round(float(dec.coefficients[j]), 4),
            "loss_fit": r["a"], "loss_promoted": r["b"], "diff": r["diff"], "diff_se": r["diff_se"],
            "samples": r["samples"], "verdict": "fit" if r["diff"] > 2 * r["diff_se"] else
            "promoted" if r["diff"] < -2 * r["diff_se"] else "indifferent"}


def timestep_diagnostic(pipe, spec: Spec, concept: str, images: torch.Tensor, *, template: str = TEMPLATE,
                        bins: int = 10, repeats: int = 20) -> dict:
    """Is the diffusion loss semantic at every noise level? On ``images`` of ``concept``: the loss of the
    concept's own word, of the spec's constituents mixed by their weights, and of the filler word (a word that
    names nothing drawn), per band of t. ``first_semantic_band``: the lowest band from which the word and the
    mixture both beat the filler in every band above (None: never)."""
    tok = pipe.tokenizer
    wid = lambda w: tok(w, add_special_tokens=False).input_ids[0]  # every world word is one token (spec check)
    norm = vocab_norm(pipe)
    cons = spec.concepts[concept].constituents
    vec = lambda words, weights: combine(torch.tensor(weights, dtype=torch.float32),
                                         token_embeddings(pipe, [wid(w) for w in words]), norm)
    vectors = {f"the word '{concept}'": vec([concept], [1.0]),
               "the spec's mixture": vec(list(cons), list(cons.values())),
               f"the filler '{spec.filler_word}'": vec([spec.filler_word], [1.0])}
    res = loss_by_timestep(pipe, images, vectors, template=template, bins=bins, repeats=repeats)
    word, mix, filler = (res[k]["bands"] for k in vectors)
    ok = [word[i] < filler[i] and mix[i] < filler[i] for i in range(bins)]
    first = next((i for i in range(bins) if all(ok[i:])), None)
    return {"concept": concept, "losses": res, "first_semantic_band": first, "bins": bins}
