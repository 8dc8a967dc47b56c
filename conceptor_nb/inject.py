"""Putting a pseudo-token into the text encoder, and taking it out again.

The prompt "a photo of a <>" is written with a placeholder word; a forward hook
on the text encoder's token-embedding table replaces the placeholder's
embedding by the pseudo-token w*, only in rows whose token ids are exactly that
prompt's (so the unconditional "" rows of classifier-free guidance, and any
other prompt, pass untouched). Leaving the ``with`` block removes the hook:
the pipeline is as it was.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

PLACEHOLDER = "sks"  # a single CLIP token; only rows equal to the full template prompt are touched


def template_prompt(template: str, word: str = PLACEHOLDER) -> str:
    return template.format(word)


def tokenize(tokenizer, prompt: str | list[str]) -> torch.Tensor:
    """Token ids padded to the context length, as diffusers' ``encode_prompt`` makes them."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    for p in prompts:
        n = len(tokenizer(p, truncation=False).input_ids)
        if n > tokenizer.model_max_length:
            raise ValueError(
                f"prompt {p[:60]!r}... is {n} tokens long, more than the text encoder's context of "
                f"{tokenizer.model_max_length}"
            )
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def placeholder_position(tokenizer, template: str) -> tuple[torch.Tensor, int]:
    """The ids of the template prompt and the index of the placeholder in it."""
    ids = tokenize(tokenizer, template_prompt(template))[0]
    pid = tokenizer.convert_tokens_to_ids(PLACEHOLDER + "</w>")
    hits = (ids == pid).nonzero().flatten()
    if len(hits) != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}' and not the word {PLACEHOLDER!r}")
    return ids, int(hits[0])


@contextmanager
def pseudo_token(pipe, vector: torch.Tensor, template: str = "a photo of a {}"):
    """Within the block, the prompt ``template.format(PLACEHOLDER)`` means ``vector``.

    ``vector`` is (d,) for one pseudo-token, or (B, d) for B prompts in a batch
    (row b of the matching prompts gets ``vector[b]``). Gradients flow into
    ``vector``. Use ``template_prompt(template)`` as the prompt.
    """
    ids, pos = placeholder_position(pipe.tokenizer, template)
    table = pipe.text_encoder.get_input_embeddings()
    width = table.weight.shape[1]
    if vector.shape[-1] != width:
        raise ValueError(f"pseudo-token has width {vector.shape[-1]}, the text encoder's embeddings have {width}")

    def hook(module, inputs, output):
        input_ids = inputs[0]
        rows = (input_ids == ids.to(input_ids.device)).all(dim=-1)
        if not rows.any():
            return output
        v = vector.to(device=output.device, dtype=output.dtype)
        n = int(rows.sum())
        if v.dim() == 2 and v.shape[0] != n:
            raise ValueError(f"{v.shape[0]} pseudo-tokens for {n} prompts")
        new = output.clone()
        new[rows, pos] = v if v.dim() == 2 else v.expand(n, -1)
        return new

    handle = table.register_forward_hook(hook)
    try:
        yield template_prompt(template)
    finally:
        handle.remove()
