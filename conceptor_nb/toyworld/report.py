"""The toy world's reports: the model's quality report (:func:`full_report`), the decompositions scored
against the spec (:func:`decomposition_report`, issue 11's measurements, with :func:`summarise`), and both
as Markdown (what ``conceptor_nb/data/toyworld/README.md`` shows between the evaluate markers)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import data_dir
from ..io import atomic_write, dumps, read_json
from ..method.decompose import decompose
from ..method.dictionary import clean_token
from ..method.generate import concept_images
from ..method.vocab import vocab_text_features
from .diagnostics import (clip_constituent_ranks, miss_check, model_fidelity, null_test, timestep_diagnostic,
                          vocab_norms, word_accuracy)
from .metrics import (chance_overlap, constituent_shares, drawn_constituents, images_of, mixture_proportions,
                      score_decomposition, toy_settings, top_overlap)
from .oracle import Oracle
from .render import render_word
from .spec import Spec, load_spec

README_BEGIN, README_END = "<!-- evaluate --decompose: begin -->", "<!-- evaluate --decompose: end -->"


def shipped_report() -> dict:
    """The last ``evaluate --decompose`` report of the shipped toy world."""
    return read_json(data_dir() / "toyworld" / "decomposition_report.json")


def full_report(pipe, clip, spec: Spec, n: int = 32, seed: int = 0, *, steps: int, guidance: float, sampler: str,
                pairs: list[str] | None = None, log=print) -> dict:
    """The model's quality, measured with the oracle: token-table norms, plain words and pairs, each hidden
    concept's mixture and (with a CLIP) the CLIP ranks of its constituents, and the bias shifts."""
    oracle = Oracle(spec)
    kw = dict(steps=steps, guidance=guidance, sampler=sampler)
    out = {"settings": {"n": n, "seed": seed, **kw}}
    out["vocab_norms"] = {k: round(v, 4) for k, v in vocab_norms(pipe.text_encoder, spec, pipe.tokenizer).items()}
    log(f"vocab norms {out['vocab_norms']}")
    words = spec.colour_words + spec.shape_words + spec.object_words
    pairs = pairs if pairs is not None else [f"{c} {s}" for c, s in zip(spec.colour_words, spec.shape_words * 2)]
    out["word_accuracy"] = {}
    for w in words + pairs:
        out["word_accuracy"][w] = word_accuracy(pipe, spec, [w], n, seed, oracle=oracle, **kw)[w]
        log(f"word {w!r}: {out['word_accuracy'][w]:.2f}")
    out["mixtures"] = {}
    feats = vocab_text_features(clip, (spec.template,), cache_dir=False, verbose=False) if clip is not None else None
    out["clip_ranks_generated"], out["clip_ranks_rendered"] = {}, {}
    for c in spec.concept_words:
        imgs = images_of(pipe, spec.prompt(c), n, seed, **kw)
        m = mixture_proportions(pipe, spec, c, oracle=oracle, images=imgs)
        out["mixtures"][c] = m.as_dict()
        log(f"concept {c}: spec {m.spec} generated {m.generated}")
        if clip is not None:
            out["clip_ranks_generated"][c] = clip_constituent_ranks(clip, spec, imgs, c, feats)
            out["clip_ranks_rendered"][c] = clip_constituent_ranks(
                clip, spec, torch.from_numpy(render_word(spec, c, n, seed)), c, feats)
            log(f"  clip ranks (generated) {out['clip_ranks_generated'][c]['constituent_ranks']}")
    out["bias_shift"] = {}
    for c, con in spec.concepts.items():
        if con.bias:
            m = mixture_proportions(pipe, spec, c, n, seed, oracle=oracle, prompt=spec.prompt(con.bias["minority"], c), **kw)
            out["bias_shift"][c] = m.as_dict()
            log(f"bias shift {m.prompt!r}: {m.generated}")
    return out


def decomposition_report(pipe, clip, spec: Spec, seeds=(0, 1, 2), *, settings=None, concepts=None, k: int = 5,
                         top: int = 10, min_share: float = 0.10, render_n: int | None = None, null_n: int = 32,
                         guidances=(1.0, 2.0, 4.0, 7.5), guidance_n: int = 128, cache_dir=None, log=print,
                         partial_path=None, diagnostic_seed: int | None = 7, miss_repeats: int = 20,
                         word_n: int = 32) -> dict:
    """Issue 11's measurements with ``settings`` (default: the toy world's profile). Per concept and run (a run's
    seed picks disjoint concept images): the top-``top`` tokens, recall@``k`` against the spec's constituents and
    against the drawn ones (shown in >= ``min_share`` of that run's concept images), the tokens outside the
    world's words in the top ``k`` (each null-tested), the oracle shares of the concept images and of the
    pseudo-token's ``render_n`` renders, and a :func:`miss_check` of each drawn constituent a run misses
    (``miss_repeats`` noise draws per image; 0: none). Then :func:`summarise`, the :func:`timestep_diagnostic` on
    the concept images of run ``diagnostic_seed`` (None: skip) and :func:`model_fidelity`. ``partial_path``: what
    is done so far is written there after every run."""
    s = settings or toy_settings()
    oracle = Oracle(spec)
    world = set(spec.world_words)
    concepts = list(concepts or spec.concept_words)
    gen_kw = dict(steps=s.gen_steps, guidance=s.guidance, sampler=s.sampler)
    out = {"settings": {"profile": s.to_dict(), "seeds": list(seeds), "k": k, "top": top, "min_share": min_share},
           "runs": {}, "null_tests": {}}
    for seed in seeds:
        for c in concepts:
            t = time.time()
            dec = decompose(pipe, c, clip=clip, settings=s.replace(seed=int(seed)), cache_dir=cache_dir, verbose=False)
            imgs = dec.concept_images(pipe, cache_dir=cache_dir)
            m = mixture_proportions(pipe, spec, c, oracle=oracle, images=imgs)
            drawn = drawn_constituents(spec, c, m.generated, min_share)
            words = [clean_token(x) for x in dec.tokens[:top]]
            sc = score_decomposition(dec, spec, c, k=k)
            found_drawn = [w for w in drawn if w in words[:k]]
            row = {"concept": c, "seed": int(seed), "image_seeds": [dec.seeds(1)[0], len(imgs)],
                   "top": [[w, round(float(x), 4)] for w, x in zip(words, dec.coefficients[:top])],
                   "dictionary_size": len(dec.tokens), f"recall@{k}_spec": sc.recall_at_k,
                   f"recall@{k}_drawn": len(found_drawn) / len(drawn) if drawn else float("nan"),
                   "drawn": drawn, "missing_spec": sc.missing, "missing_drawn": [w for w in drawn if w not in found_drawn],
                   "not_world_in_top": [w for w in words[:k] if w not in world],
                   "concept_images": m.generated}
            row.update(evidence(dec, spec, c, drawn, words))
            if render_n:
                n = min(render_n, len(imgs))
                rend = dec.render(pipe, dec.seeds(n))
                row["renders"] = mixture_proportions(pipe, spec, c, oracle=oracle, images=rend).generated
                row["concept_images_first_n"] = mixture_proportions(pipe, spec, c, oracle=oracle, images=imgs[:n]).generated
                row["render_tv"] = 0.5 * sum(abs(row["renders"][x] - row["concept_images_first_n"][x]) for x in row["renders"])
            if row["missing_drawn"] and miss_repeats:
                row["miss_checks"] = [miss_check(pipe, dec, imgs, w, k=k, repeats=miss_repeats) for w in row["missing_drawn"]]
            row["seconds"] = round(time.time() - t, 1)
            out["runs"].setdefault(c, []).append(row)
            if log:
                log(f"seed {seed} {c}: top {words[:k]} recall spec {row[f'recall@{k}_spec']:.2f} drawn "
                    f"{row[f'recall@{k}_drawn']:.2f} not-world {row['not_world_in_top']} ({row['seconds']}s)")
            for w in row["not_world_in_top"]:
                if w not in out["null_tests"]:
                    out["null_tests"][w] = null_test(pipe, spec, w, null_n, 0, oracle=oracle, **gen_kw)
            if partial_path:  # in case the run is cut short
                atomic_write(partial_path, dumps(out))
    out["summary"] = summarise(out["runs"], k, top)
    if diagnostic_seed is not None:
        out["timestep_diagnostic"] = {"seed": int(diagnostic_seed), "concepts": {}}
        for c in concepts:
            imgs = concept_images(pipe, s.template.format(c), s.n_train, int(diagnostic_seed), steps=s.gen_steps,
                                  guidance=s.guidance, sampler=s.sampler, cache_dir=cache_dir, verbose=False)
            out["timestep_diagnostic"]["concepts"][c] = timestep_diagnostic(pipe, spec, c, imgs, template=s.template)
    out.update(model_fidelity(pipe, spec, s, guidances, guidance_n, word_n, oracle=oracle, log=log))
    return out


def evidence(dec, spec: Spec, concept: str, drawn: list[str], words: list[str]) -> dict:
    """What a run's error bars and significance test say: the supported and tested words, the R-precision of the
    ranking (the top r, r = number of constituents, that are constituents), the top words' spread and kept share,
    and the number of UNet evaluations."""
    cons = spec.concepts[concept].constituents
    tested, supported = len(dec.delta_loss), [w for w, ok in zip(words, dec.supported()) if ok]
    visible = set(drawn) | {c for o in drawn if o in spec.objects for c in spec.objects[o]["colours"]}
    return {"supported": supported, "tested": tested, "supported_visible": [w for w in supported if w in visible],
            "r_precision": len(set(words[:len(cons)]) & set(cons)) / len(cons),
            "test": [[w, round(d, 7), round(e, 7)] for w, d, e in zip(words, dec.delta_loss, dec.delta_se)],
            "spread": [round(x, 4) for x in dec.spread[:len(words)]], "kept": dec.kept[:len(words)],
            "fits": dec.settings.fits, "unet_evals": dec.history.get("unet_evals", {}).get("total")}


def evidence_summary(runs: dict) -> dict:
    """Issue 23's targets over the runs: the share of supported tokens that are drawn constituents (``_visible``:
    or a colour of a drawn object, like red for apples, which the spec does not list), each drawn
    constituent's support count (runs where it is supported / runs where it is drawn), the mean R-precision, the
    mean Jaccard of the supported sets between a concept's runs, and the renders' mean total-variation distance."""
    rows = [r for rs in runs.values() for r in rs if "supported" in r]
    if not rows:
        return {}
    sup = [(w in r["drawn"]) for r in rows for w in r["supported"]]
    counts = {}
    for c, rs in runs.items():
        for w in {w for r in rs for w in r["drawn"]}:
            drawn_in = [r for r in rs if w in r["drawn"]]
            counts[f"{c}:{w}"] = [sum(w in r["supported"] for r in drawn_in), len(drawn_in)]
    jac = [len(set(a["supported"]) & set(b["supported"])) / max(1, len(set(a["supported"]) | set(b["supported"])))
           for rs in runs.values() for i, a in enumerate(rs) for b in rs[i + 1:]]
    tv = [r["render_tv"] for r in rows if "render_tv" in r]
    vis = [w in r["supported_visible"] for r in rows for w in r["supported"]]
    return {"supported_precision": float(np.mean(sup)) if sup else float("nan"), "supported_tokens": len(sup),
            "supported_visible_precision": float(np.mean(vis)) if vis else float("nan"),
            "drawn_supported": counts, "drawn_supported_share": sum(a for a, _ in counts.values()) / max(1, sum(b for _, b in counts.values())),
            "drawn_supported_min": min((a / b for a, b in counts.values()), default=float("nan")),
            "r_precision": float(np.mean([r["r_precision"] for r in rows])),
            "supported_jaccard": float(np.mean(jac)) if jac else float("nan"),
            "render_tv": float(np.mean(tv)) if tv else float("nan"), "render_tv_max": max(tv, default=float("nan")),
            "unet_evals_mean": float(np.mean([r["unet_evals"] or 0 for r in rows])),
            "seconds_mean": float(np.mean([r["seconds"] for r in rows]))}


def summarise(runs: dict, k: int = 5, top: int = 10) -> dict:
    """Means over the runs of :func:`decomposition_report` (``{concept: [row per run]}``), and each concept's
    top-``top`` (and top-``k``) stability (mean pairwise overlap across its runs) beside the chance overlap for
    its dictionary."""
    stab, chance, stab_k = {}, {}, {}
    for c, rows in runs.items():
        pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]]

        def mean_overlap(n):
            return float(np.mean([top_overlap([w for w, _ in a["top"][:n]], [w for w, _ in b["top"][:n]])
                                  for a, b in pairs])) if pairs else float("nan")

        stab[c], stab_k[c] = mean_overlap(top), mean_overlap(k)
        chance[c] = float(np.mean([chance_overlap(top, r["dictionary_size"]) for r in rows]))
    allrows = [r for rows in runs.values() for r in rows]
    return {
        "decompositions": len(allrows),
        f"recall@{k}_spec_mean": float(np.mean([r[f"recall@{k}_spec"] for r in allrows])),
        f"recall@{k}_drawn_mean": float(np.nanmean([r[f"recall@{k}_drawn"] for r in allrows])),
        f"recall@{k}_drawn_all_perfect": all(r[f"recall@{k}_drawn"] == 1.0 for r in allrows),
        f"not_world_in_top{k}_per_decomposition": float(np.mean([len(r["not_world_in_top"]) for r in allrows])),
        f"stability_top{top}": stab, f"chance_top{top}": chance,
        f"stability_top{top}_mean": float(np.nanmean(list(stab.values()))),
        f"stability_top{k}": stab_k, f"stability_top{k}_mean": float(np.nanmean(list(stab_k.values()))),
        f"chance_top{top}_mean": float(np.mean(list(chance.values()))), **evidence_summary(runs),
    }


def report_headline(rep: dict, spec: Spec | None = None) -> pd.DataFrame:
    """The report's main numbers, each beside what a ranking drawn at random from the dictionary would give."""
    spec, s = spec or load_spec(None), rep["summary"]
    rows = [r for rs in rep["runs"].values() for r in rs]
    size = float(np.mean([r["dictionary_size"] for r in rows]))
    share = lambda n: float(np.mean([n(r) / r["dictionary_size"] for r in rows]))  # noqa: E731
    cons = share(lambda r: len(spec.concepts[r["concept"]].constituents))
    return pd.DataFrame([
        ("recall@5 of the spec's constituents", s["recall@5_spec_mean"], chance_overlap(5, size)),
        ("recall@5 of the constituents the model draws", s["recall@5_drawn_mean"], chance_overlap(5, size)),
        ("R-precision: the top r are the r constituents", s.get("r_precision"), cons),
        ("top-10 overlap of runs on disjoint images", s["stability_top10_mean"], s["chance_top10_mean"]),
        ("supported tokens that are drawn constituents", s.get("supported_precision"), share(lambda r: len(r["drawn"]))),
    ], columns=["measure", "value", "chance"]).round(2)


# --------------------------------------------------------------------------- Markdown
def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.0f}%"  # NaN, or null in a saved report


def report_markdown(rep: dict, spec: Spec) -> str:
    """The decomposition report as Markdown tables (what the README shows)."""
    k, top = rep["settings"]["k"], rep["settings"]["top"]
    lines = ["| concept | run (seed) | top-10 tokens (coefficient) | recall@5 spec | recall@5 drawn | not-world in top 5 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c, rows in rep["runs"].items():
        for r in rows:
            toks = ", ".join(f"{w} {x:.2f}" for w, x in r["top"])
            lines.append(f"| {c} | {r['seed']} | {toks} | {_pct(r[f'recall@{k}_spec'])} | {_pct(r[f'recall@{k}_drawn'])} "
                         f"({', '.join(r['drawn'])}) | {', '.join(r['not_world_in_top']) or '-'} |")
    sm = rep["summary"]
    lines += ["", f"Mean recall@{k}: spec constituents {_pct(sm[f'recall@{k}_spec_mean'])}, drawn constituents "
              f"{_pct(sm[f'recall@{k}_drawn_mean'])} (every run 100%: {sm[f'recall@{k}_drawn_all_perfect']}); "
              f"tokens outside the world's words in a top {k}: {sm[f'not_world_in_top{k}_per_decomposition']:.2f} per decomposition.",
              ""]
    sk = sm.get(f"stability_top{k}")  # reports written before it was measured lack the top-k column
    lines += [f"| concept | top-{top} stability across runs | chance overlap (top {top} / dictionary size) |"
              + (f" top-{k} stability |" if sk else ""), "| --- | --- | --- |" + (" --- |" if sk else "")]
    for c in rep["runs"]:
        lines.append(f"| {c} | {sm[f'stability_top{top}'][c]:.2f} | {sm[f'chance_top{top}'][c]:.2f} |"
                     + (f" {sk[c]:.2f} |" if sk else ""))
    lines.append(f"| mean | {sm[f'stability_top{top}_mean']:.2f} | {sm[f'chance_top{top}_mean']:.2f} |"
                 + (f" {sm[f'stability_top{k}_mean']:.2f} |" if sk else ""))
    lines += evidence_markdown(rep)
    checks = [(c, r, m) for c, rows in rep["runs"].items() for r in rows for m in r.get("miss_checks", [])]
    if checks:
        lines += ["", f"Drawn constituents missing from a top {k}: would the fit's own objective rank them higher? The fit's "
                  f"pseudo-token against the same one with the token given the {k}th largest coefficient, under the fit's "
                  "loss on that run's concept images (same noise; difference x 1000 with its standard error; positive: "
                  "promoting the token reconstructs the images worse; the objective prefers whichever is better by more "
                  "than two standard errors):", "",
                  "| concept | run | token | rank | share of the run's images | loss x 1000, fit | promoted - fit | "
                  "the objective prefers |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c, r, m in checks:
            if not m["in_dictionary"]:
                lines.append(f"| {c} | {r['seed']} | {m['word']} | not in the dictionary | | | | |")
                continue
            share = _pct(constituent_shares(spec, c, r["concept_images"]).get(m["word"], float("nan")))
            lines.append(f"| {c} | {r['seed']} | {m['word']} | {m['rank']} | {share} | {1000 * m['loss_fit']:.2f} | "
                         f"{1000 * m['diff']:+.4f} ± {1000 * m['diff_se']:.4f} | {m['verdict']} |")
    if rep.get("timestep_diagnostic"):
        td = rep["timestep_diagnostic"]
        bins = next(iter(td["concepts"].values()))["bins"]
        lines += ["", f"Reconstruction loss x 1000 by noise level (t in tenths of the schedule), on held-out concept images "
                  f"(run seed {td['seed']}); `all`: uniform t, what the fit minimises:", "",
                  "| concept | pseudo-token | all | " + " | ".join(f"t {i}/{bins}" for i in range(bins)) + " |",
                  "| --- | --- | --- |" + " --- |" * bins]
        for c, d in td["concepts"].items():
            for name, r in d["losses"].items():
                lines.append(f"| {c} | {name} | {1000 * r['all']:.1f} | " + " | ".join(f"{1000 * x:.1f}" for x in r["bands"]) + " |")
        lines += ["", "First band from which the concept's word and the spec's mixture both beat the filler in every higher "
                  "band: " + ", ".join(f"{c} {d['first_semantic_band'] if d['first_semantic_band'] is not None else 'never'}"
                                        f"/{bins}" for c, d in td["concepts"].items()) + "."]
    if rep.get("null_tests"):
        lines += ["", "| token outside the world | oracle TV distance to the empty template | mean pixel distance |", "| --- | --- | --- |"]
        for w, t in rep["null_tests"].items():
            lines.append(f"| {w} | {t['tv_distance_to_empty']:.2f} | {t['pixel_distance_to_empty']:.3f} |")
    if any("renders" in r for rows in rep["runs"].values() for r in rows):
        lines += ["", "| concept | run | concept images (oracle) | pseudo-token renders, same seeds (oracle) |", "| --- | --- | --- | --- |"]
        for c, rows in rep["runs"].items():
            for r in rows:
                if "renders" in r:
                    f = lambda d: ", ".join(f"{a} {_pct(b)}" for a, b in d.items())
                    lines.append(f"| {c} | {r['seed']} | {f(r['concept_images_first_n'])} | {f(r['renders'])} |")
    return "\n".join(lines + fidelity_markdown(rep, spec))


def evidence_markdown(rep: dict) -> list[str]:
    """The significance test's verdicts per run and issue 23's targets, as Markdown lines (none in older reports)."""
    sm = rep["summary"]
    if "supported_precision" not in sm:
        return []
    lines = ["", "Which tokens the significance test supports (removing the token from the pseudo-token raises the "
             "held-out diffusion loss by more than two standard errors; the top 10 tested):", "",
             "| concept | run | drawn constituents | supported | R-precision |", "| --- | --- | --- | --- | --- |"]
    for c, rows in rep["runs"].items():
        for r in rows:
            lines.append(f"| {c} | {r['seed']} | {', '.join(r['drawn'])} | {', '.join(r['supported']) or '-'} | "
                         f"{r['r_precision']:.2f} |")
    missed = {k: v for k, v in sm["drawn_supported"].items() if v[0] < v[1]}
    lines += ["", "| target (issue 23) | measured | target |", "| --- | --- | --- |",
              f"| supported tokens that are drawn constituents | {_pct(sm['supported_precision'])} of "
              f"{sm['supported_tokens']} ({_pct(sm['supported_visible_precision'])} counting a drawn object's colour) "
              f"| >= 95% |",
              f"| drawn constituents supported (all runs) | {_pct(sm['drawn_supported_share'])}; worst "
              f"{_pct(sm['drawn_supported_min'])} | every one in >= 17 of 18 runs |",
              f"| R-precision of the ranking | {sm['r_precision']:.2f} | >= 0.95 |",
              f"| Jaccard of the supported sets across runs | {sm['supported_jaccard']:.2f} | >= 0.9 |",
              f"| renders' composition, total variation | {sm['render_tv']:.2f} (worst {sm['render_tv_max']:.2f}) | "
              f"<= 0.10 |",
              "", "Drawn constituents the test did not support in every run (supported / drawn runs): "
              + (", ".join(f"{k} {a}/{b}" for k, (a, b) in missed.items()) or "none") + "."]
    return lines


def fidelity_markdown(rep: dict, spec: Spec) -> list[str]:
    """The model-fidelity part of a report (guidance table, what the unresolved images show, plain words) as
    Markdown lines."""
    lines = []
    if rep.get("guidance_table"):
        gs = list(rep["guidance_table"])
        lines += ["", "| concept | spec | " + " | ".join(f"guidance {g}" for g in gs) + " |", "| --- | --- |" + " --- |" * len(gs)]
        for c in spec.concept_words:
            if c not in rep["guidance_table"][gs[0]]:
                continue
            want = ", ".join(f"{x.label} {_pct(x.weight)}" for x in spec.concepts[c].components)
            cells = [", ".join(f"{a} {_pct(b)}" for a, b in rep["guidance_table"][g][c].items()) for g in gs]
            lines.append(f"| {c} | {want} | " + " | ".join(cells) + " |")
        fd = rep.get("fidelity")
        if fd:
            lines += ["", f"Fidelity: at guidance 1 every component within 10 points of the spec: {fd['ok_at_1']} "
                      f"(largest gap per concept: " + ", ".join(f"{c} {100 * v:.0f}" for c, v in fd["max_diff_at_1"].items())
                      + f"); at guidance {fd['guidance']:g} every component drawn in >= 10% of images: {fd['ok_at_guidance']} "
                      f"(smallest share: " + ", ".join(f"{c} {_pct(v)}" for c, v in fd["min_share_at_guidance"].items()) + ")."]
        other = rep.get("guidance_other", {}).get(gs[0])
        if other:
            lines += ["", f"What the images that show no component of the concept show instead, at guidance {float(gs[0]):g} (share of "
                      "all the concept's images, the three most frequent):", "",
                      "| concept | other | " + " | ".join(["most frequent"] * 3) + " |", "| --- | --- | --- | --- | --- |"]
            for c, d in other.items():
                cells = [f"{w} {_pct(x)}" for w, x in list(d.items())[:3]] + [""] * 3
                lines.append(f"| {c} | {_pct(rep['guidance_table'][gs[0]][c]['other'])} | " + " | ".join(cells[:3]) + " |")
    wf = rep.get("word_fidelity")
    if wf:
        gs = list(wf)
        lines += ["", f"Plain words: the share of images ({wf[gs[0]].get('n', 32)} per prompt, \"a photo of a red\", \"a photo of a red circle\") that "
                  "show what the prompt says, by the oracle. Colour-shape pairs: every colour with every shape; a word's "
                  "row: mean over its pairs; last rows: means over all pairs.", "",
                  "| prompt | " + " | ".join(f"guidance {float(g):g}: alone" for g in gs) + " | "
                  + " | ".join(f"guidance {float(g):g}: in pairs (both right)" for g in gs) + " |",
                  "| --- |" + " --- |" * (2 * len(gs))]
        words = list(wf[gs[0]]["words"])
        for w in words:
            alone = [_pct(wf[g]["words"][w]) for g in gs]
            paired = []
            for g in gs:
                ps = [v["both"] for key, v in wf[g]["pairs"].items() if w in key.split()]
                paired.append(_pct(float(np.mean(ps))) if ps else "-")
            lines.append(f"| {w} | " + " | ".join(alone) + " | " + " | ".join(paired) + " |")
        for part in ("both", "colour", "glyph"):
            name = {"both": "all pairs: both right", "colour": "all pairs: colour right", "glyph": "all pairs: shape right"}[part]
            lines.append(f"| {name} | " + " | ".join([""] * len(gs)) + " | "
                         + " | ".join(_pct(float(np.mean([v[part] for v in wf[g]["pairs"].values()]))) for g in gs) + " |")
    return lines




def write_readme_section(path, markdown: str) -> None:
    """Replace the text between the README's evaluate markers with ``markdown`` (append the section if absent)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    block = f"{README_BEGIN}\n{markdown}\n{README_END}"
    if README_BEGIN in text and README_END in text:
        text = text[: text.index(README_BEGIN)] + block + text[text.index(README_END) + len(README_END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write(path, text)
