"""``decompose(pipe, "a dog")``: the concept's images, its CLIP dictionary, the fit, and the Decomposition."""
from __future__ import annotations

import time

import torch

from ..checks import as_images, check_pipe, check_setting_names, parse_concept, pipeline_resolution, validate_settings
from ..clip import clip_for
from ..config import Settings, resolve
from ..errors import InvalidInputError
from ..models import model_name
from .decomposition import Decomposition
from .dictionary import Dictionary, build_dictionary
from .fit import fit, vocab_norm
from .generate import concept_images
from .inject import tokenize


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
    (InvalidInputError). ``checkpoint_dir``: the fit saves its state there at each validation and resumes
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
                                      precision=s.vocab_precision, exclude_concept=exclude_concept,
                                      exclude_threshold=s.exclude_threshold, null_threshold=s.null_threshold,
                                      cache_dir=cache_dir, verbose=verbose)
    timings["dictionary_s"] = time.perf_counter() - t0

    coefficients, history = fit(pipe, images, dictionary.token_ids, s, clip=clip, val_images=val_images,
                                rescale=rescale, verbose=verbose, checkpoint=checkpoint_dir)
    history["timings"] = {**timings, **history.get("timings", {})}
    order = torch.argsort(coefficients, descending=True).tolist()
    return Decomposition(
        concept=concept, tokens=[dictionary.tokens[i] for i in order],
        token_ids=[dictionary.token_ids[i] for i in order], coefficients=[float(coefficients[i]) for i in order],
        n_tokens=min(s.n_tokens, len(order)), norm=vocab_norm(pipe) if rescale else None, template=s.template,
        prompt=prompt, model=model_name(pipe), clip=getattr(clip, "name", "") or "",
        dictionary_scores=[float(dictionary.scores[i]) for i in order], excluded=list(dictionary.excluded),
        settings=s, history=history,
    )
