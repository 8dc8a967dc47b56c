"""The pseudo-token: a forward hook on the token-embedding table puts a vector w* in place of the template's
placeholder word, only in rows that are exactly the template prompt (other prompts pass untouched)."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..config import TEMPLATE

PLACEHOLDER = "sks"  # a single CLIP token


def template_prompt(template: str, word: str = PLACEHOLDER) -> str:
    return template.format(word)


def tokenize(tokenizer, prompt: str | list[str]) -> torch.Tensor:
    """Token ids padded to the context length, as diffusers' ``encode_prompt`` makes them."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    for p in prompts:
        n = len(tokenizer(p, truncation=False).input_ids)
        if n > tokenizer.model_max_length:
            raise ValueError(f"prompt {p[:60]!r}... is {n} tokens long, more than the text encoder's context of "
                             f"{tokenizer.model_max_length}")
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encoders(pipe) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, text encoder) pairs: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def token_embeddings(pipe, token_ids) -> torch.Tensor:
    """Rows of the token-embedding table, float32: (n, d); SDXL: both tables' rows side by side, (n, d1 + d2)."""
    rows = []
    for _, enc in encoders(pipe):
        table = enc.get_input_embeddings().weight
        rows.append(table[torch.as_tensor(list(token_ids), device=table.device)].float())
    return torch.cat([r.to(rows[0].device) for r in rows], dim=1)


@contextmanager
def pseudo_token(pipe, vector: torch.Tensor, template: str = TEMPLATE):
    """Within the block the prompt ``template_prompt(template)`` (yielded) means ``vector``: (d,), or (B, d) for B
    matching prompts of a batch; gradients flow into it. SDXL: the first d1 numbers go to the first table."""
    widths = [enc.get_input_embeddings().weight.shape[1] for _, enc in encoders(pipe)]
    if vector.shape[-1] != sum(widths):
        raise ValueError(f"pseudo-token has width {vector.shape[-1]}, the text encoder's embeddings have "
                         f"{' + '.join(map(str, widths))}")
    handles, start = [], 0
    try:
        for (tokenizer, encoder), width in zip(encoders(pipe), widths):
            ids = tokenize(tokenizer, template_prompt(template))[0]
            hits = (ids == tokenizer.convert_tokens_to_ids(PLACEHOLDER + "</w>")).nonzero().flatten()
            if len(hits) != 1:
                raise ValueError(f"template {template!r} must contain exactly one '{{}}' and not the word {PLACEHOLDER!r}")
            part = vector[..., start : start + width]
            start += width
            handles.append(encoder.get_input_embeddings().register_forward_hook(_hook(ids, int(hits[0]), part)))
        yield template_prompt(template)
    finally:
        for handle in handles:
            handle.remove()


def _hook(ids: torch.Tensor, pos: int, vector: torch.Tensor):
    def hook(module, inputs, output):
        rows = (inputs[0] == ids.to(inputs[0].device)).all(dim=-1)
        if not rows.any():
            return output
        v = vector.to(device=output.device, dtype=output.dtype)
        n = int(rows.sum())
        if v.dim() == 2 and v.shape[0] != n:
            raise ValueError(f"{v.shape[0]} pseudo-tokens for {n} prompts")
        new = output.clone()
        new[rows, pos] = v if v.dim() == 2 else v.expand(n, -1)
        return new

    return hook


def encode_template(pipe, vector: torch.Tensor, template: str, ids_prompt: torch.Tensor):
    """The UNet's conditioning for the template prompt with ``vector`` in it, as the pipeline makes it:
    (encoder_hidden_states, added_cond_kwargs: SDXL's pooled embedding and size/crop ids, else None)."""
    if getattr(pipe, "text_encoder_2", None) is None:
        with pseudo_token(pipe, vector, template):
            return pipe.text_encoder(ids_prompt)[0], None
    device = pipe.text_encoder_2.device
    with pseudo_token(pipe, vector, template) as prompt:
        cond, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=cond.dtype)
    return cond, {"text_embeds": pooled, "time_ids": time_ids}
