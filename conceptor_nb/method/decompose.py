"""``decompose(pipe, "a dog")``: the concept's images, its CLIP dictionary, the fit, and the Decomposition."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..checks import as_images, check_pipe, check_setting_names, parse_concept, pipeline_resolution, validate_settings
from ..clip import clip_for
from ..config import Settings, resolve
from ..errors import InvalidInputError
from ..models import model_name
from .decomposition import Decomposition
from .dictionary import Dictionary, build_dictionary, candidates
from .fit import fit, removal_test, vocab_norm
from .generate import concept_images
from .inject import tokenize
from .vocab import vocab_text_features


def run_settings(pipe, settings: Settings | None = None, **overrides) -> Settings:
    """The settings of a run on ``pipe``: ``settings`` (default: the profile of the pipeline's model, see
    ``config.resolve``) with ``overrides`` applied, None included (``exclude_threshold=None``: no such filter)."""
    return (settings or resolve(model_name(pipe), warn=False)[0].settings).replace(**overrides)


def decompose(pipe, concept: str, *, clip=None, settings: Settings | None = None, images: torch.Tensor | None = None,
              val_images: torch.Tensor | None = None, dictionary: Dictionary | None = None,
              exclude_concept: bool = True, rescale: bool = True, cache_dir=None, verbose: bool = True,
              checkpoint_dir=None, refresh: bool = False, **overrides) -> Decomposition:
    """Decompose ``concept`` into a weighted set of tokens of ``pipe``'s vocabulary.

    Every field of :class:`conceptor_nb.config.Settings` is a keyword argument (``n_train``, ``dict_size``,
    ``steps`` ...); the rest come from ``settings`` or the pipeline's profile. ``images``/``val_images`` (in
    [0, 1]) replace the generated concept images, ``dictionary`` the CLIP dictionary; ``clip``: a Clip or a
    name (default: the profile's, loaded when needed). Every input is checked before any work
    (InvalidInputError). ``checkpoint_dir``: the fit saves its state there every ``val_every`` steps (50 without validation) and resumes
    from a matching one (same coefficients as an uninterrupted run). ``refresh``: regenerate the images.
    """
    check_pipe(pipe)
    check_setting_names(overrides)
    if settings is not None and not isinstance(settings, Settings):
        raise InvalidInputError(f"settings must be a conceptor_nb.Settings or None, got {type(settings).__name__}")
    s = validate_settings(run_settings(pipe, settings, **overrides))
    word, prompt = parse_concept(concept, s.template)
    tokenize(pipe.tokenizer, prompt)
    if dictionary is None:
        vocab = len(pipe.tokenizer) - len(set(pipe.tokenizer.all_special_ids))
        if s.dict_size > vocab:
            raise InvalidInputError(f"dict_size must be an integer between 1 and the vocabulary's {vocab} words, "
                                    f"got {s.dict_size}")
    elif not isinstance(dictionary, Dictionary) or len(dictionary) == 0:
        raise InvalidInputError(f"dictionary must be a non-empty conceptor_nb.Dictionary or None, got {dictionary!r:.80}")
    if images is not None:
        images = as_images(images, "images", pipeline_resolution(pipe))
    if val_images is not None:
        val_images = as_images(val_images, "val_images", pipeline_resolution(pipe))
    if s.fits > (s.n_train if images is None else len(images)):
        raise InvalidInputError(f"fits={s.fits} splits the concept images into {s.fits} disjoint parts, one per fit: "
                                f"it needs at least as many images (n_train={s.n_train}); lower fits or raise n_train")
    vocab_features = None
    if dictionary is None:  # enough candidate tokens for the dictionary? Said before any image is made
        clip = clip_for(pipe, clip)
        vocab_features = vocab_text_features(clip, s.clip_templates, precision=s.vocab_precision, cache_dir=cache_dir,
                                             verbose=verbose)
        left = int(candidates(clip, vocab_features, word, s.clip_templates, exclude_concept=exclude_concept,
                              exclude_threshold=s.exclude_threshold)[0].sum())
        if left < s.dict_size and s.null_threshold is None:
            raise InvalidInputError(
                f"only {left} tokens are left after excluding {word!r} and the tokens CLIP reads like it (cosine above "
                f"exclude_threshold={s.exclude_threshold}), fewer than dict_size={s.dict_size}: lower dict_size to at "
                f"most {left}, or raise exclude_threshold (or set it to none)")

    t0 = time.perf_counter()
    gen = dict(steps=s.gen_steps, guidance=s.guidance, sampler=s.sampler, cache_dir=cache_dir, refresh=refresh,
               verbose=verbose)
    if images is None:
        images = concept_images(pipe, prompt, s.n_train, s.seed, **gen)
    if val_images is None and s.val_every > 0 and s.n_val > 0:
        val_images = concept_images(pipe, prompt, s.n_val, s.seed, split="val", **gen)
    timings = {"images_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    if isinstance(clip, str) or (clip is None and (dictionary is None or val_images is not None)):
        clip = clip_for(pipe, clip)
    if dictionary is None:
        dictionary = build_dictionary(clip, images, word, s.dict_size, templates=s.clip_templates,
                                      vocab_features=vocab_features, precision=s.vocab_precision, exclude_concept=exclude_concept,
                                      exclude_threshold=s.exclude_threshold, null_threshold=s.null_threshold,
                                      cache_dir=cache_dir, verbose=verbose)
    timings["dictionary_s"] = time.perf_counter() - t0

    coefficients, spread, kept, history = fit_parts(pipe, images, dictionary.token_ids, s, clip=clip,
                                                    val_images=val_images, rescale=rescale, verbose=verbose,
                                                    checkpoint=checkpoint_dir)
    history["timings"] = {**timings, **history.get("timings", {})}
    order = torch.argsort(coefficients, descending=True).tolist()
    ids = [dictionary.token_ids[i] for i in order]
    n = min(s.n_tokens, len(order))
    norm = vocab_norm(pipe) if rescale else None
    rise, se = [], []
    if s.n_test > 0:  # the significance test of the top n tokens, on held-out images of the concept
        t0 = time.perf_counter()
        test = concept_images(pipe, prompt, s.n_test, s.seed, split="test", **gen)
        rise, se = removal_test(pipe, test, ids[:n], coefficients[order[:n]], norm, s, s.n_test * s.test_draws,
                                seed=s.seed)
        history["timings"]["test_s"] = time.perf_counter() - t0
    history["unet_evals"] = unet_evaluations(s, history, n)
    if getattr(pipe, "conceptor_lora", None):  # a fused LoRA (load_pipeline(lora=)) is part of the model
        history["lora"] = pipe.conceptor_lora
    return Decomposition(
        concept=concept, tokens=[dictionary.tokens[i] for i in order],
        token_ids=ids, coefficients=[float(coefficients[i]) for i in order], n_tokens=n, norm=norm, template=s.template,
        prompt=prompt, model=model_name(pipe), clip=getattr(clip, "name", "") or "",
        dictionary_scores=[float(dictionary.scores[i]) for i in order], excluded=list(dictionary.excluded),
        settings=s, history=history, spread=[float(spread[i]) for i in order] if spread is not None else [],
        kept=[float(kept[i]) for i in order] if kept is not None else [], delta_loss=rise, delta_se=se,
    )


def fit_parts(pipe, images, token_ids, s: Settings, *, checkpoint=None, **kw):
    """``s.fits`` fits, fit j on images j, j + K, j + 2K, ... with seed ``s.seed + j`` (one fit: the authors' fit
    on all images): (mean coefficients, their standard deviation across the fits, the share of fits that keep each
    token in their top n; both None for one fit; the history, of every fit under ``"fits"``)."""
    k = s.fits
    if k == 1:
        coefficients, history = fit(pipe, images, token_ids, s, checkpoint=checkpoint, **kw)
        return coefficients, None, None, history
    runs = [fit(pipe, images[j::k], token_ids, s.replace(seed=s.seed + j),
                checkpoint=None if checkpoint is None else Path(checkpoint) / f"fit-{j}", **kw) for j in range(k)]
    coef = torch.stack([c for c, _ in runs])
    n = min(s.n_tokens, coef.shape[1])
    kept = torch.zeros_like(coef).scatter_(1, torch.topk(coef, n, dim=1).indices, 1.0).mean(0)
    history = {**runs[0][1], "fits": [h for _, h in runs]}
    history["timings"] = {key: sum(h["timings"].get(key, 0.0) for _, h in runs) for key in runs[0][1]["timings"]}
    return coef.mean(0), coef.std(0), kept, history


def unet_evaluations(s: Settings, history: dict, n_tested: int) -> dict:
    """UNet evaluations (one image through the UNet once) of a fresh run, by stage: generation (training,
    validation and test images), the fits (``batch_size`` per step taken), validation renders, the test."""
    cfg = 2 if s.guidance > 1 else 1
    fits = history.get("fits", [history])
    validating = s.val_every > 0 and s.n_val > 0
    gen = (s.n_train + (s.n_val if validating else 0) + s.n_test) * s.gen_steps * cfg
    fit_ = sum(len(h.get("loss", [])) * min(s.batch_size, max(1, s.n_train // s.fits)) for h in fits)
    val = sum(len(h.get("validation", [])) for h in fits) * s.n_val * s.val_steps * cfg
    test = (n_tested + 1) * s.n_test * s.test_draws if s.n_test else 0
    return {"generation": gen, "fit": fit_, "validation": val, "test": test, "total": gen + fit_ + val + test}

