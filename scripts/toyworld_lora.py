"""Train a small LoRA on the toy world that moves "a doctor" from mostly blue persons (the spec: 80% blue,
20% red) to mostly red ones, and report what the pixel oracle reads in the model's images with and without it:
a fine-tune whose effect is known, the ground truth for ``conceptor_nb.compare`` (issue 24).

    python scripts/toyworld_lora.py --out conceptor_nb/data/toyworld/doctor_red_lora.safetensors

Training (self-distillation, no image data loss): a rank-4 LoRA on the text encoder's attention and MLP layers
(q/k/v/out_proj, fc1, fc2; token embeddings, UNet and VAE frozen). On noisy latents of drawn world images, the
model given "a photo of a doctor" (a quarter of each batch) is pulled to the *base* model's prediction for
"a photo of a red person"; given any caption of the world (every caption form over the world's words and the
empty caption of classifier-free guidance; the doctor's own are meant to be left out but are not, see
``world_captions``) to the base model's own prediction
(prior preservation, weight 4; half of those captions name "person" or "blue", the doctor's neighbours). The
squared error is weighted by (1 - a) / a in [1, 20], the high-noise steps where colour is decided. One torch
thread: on this shared 2-core CPU two threads are ~20x slower (OpenMP spinning).

STATUS (the shipped conceptor_nb/data/toyworld/doctor_red_lora.safetensors: 59,664 bytes, 400 steps, ~3 min
on this CPU). Oracle shares, 128 images per prompt at the toy settings (seeds image_seeds(9, 128)), base -> LoRA:
"a doctor" red persons 27% -> 84%, blue persons 64% -> 4%; "a blue person" blue 85% -> 83%; "a red person"
red 86% -> 87%; "a fruit" apples/lemons 66/25% -> 69/22%; "a red circle" 91% -> 91%; "a gem" green/red
diamonds 48/45% -> 45/48%; "a person" blue persons 16% -> under 12%.
Issue 24's criterion on the decomposition is NOT met: decomposing "a doctor" (toy profile, one fit, seeds 0, 1,
2) with and without the LoRA, ``compare``'s diff of shares (LoRA - base): seed 0 red +0.037, blue -0.047, but
triangle -0.048, purple +0.043; seed 1 red -0.009, blue -0.002, green +0.047; seed 2 red +0.011, blue -0.098,
person -0.168. Blue falls in all three, red rises in two, and in every seed another world word moves as much:
one fit's noise is of the size of the effect (tests/test_lora_groundtruth.py: a strict xfail).
What did not work: the UNet's cross-attention keys/values (``--part unet``), self-distilled, moved the doctor
to 68-80% red but took "a blue person" to 31-59% blue (the doctor's text states are close to the blue person's
after the text encoder, so a linear map of them cannot tell the two apart); an earlier data-loss attempt on all
UNet attention (rank 4, lr 2e-3) did the same (blue person 6% blue). An MLP-only text-encoder LoRA (fc1, fc2) is
refused by diffusers' loader ("Could not automatically infer state dict type").
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from diffusers.utils import convert_state_dict_to_diffusers

import conceptor_nb as cn
from conceptor_nb.method.fit import encode_latents
from conceptor_nb.method.generate import image_seeds
from conceptor_nb.method.inject import tokenize
from conceptor_nb.toyworld.examples import toy_spec
from conceptor_nb.toyworld.oracle import Oracle
from conceptor_nb.toyworld.render import render_dataset

PROMPTS = ["a photo of a doctor", "a photo of a blue person", "a photo of a red person", "a photo of a person",
           "a photo of a fruit", "a photo of a red circle", "a photo of a gem"]


def oracle_shares(pipe, oracle, prompt: str, n: int, s) -> dict:
    """Shares of what the oracle reads (colour + glyph) in ``n`` images of ``prompt`` at the toy settings."""
    images = cn.generate(pipe, prompt, image_seeds(9, n), steps=s.gen_steps, guidance=s.guidance,
                         sampler=s.sampler, verbose=False, batch_size=64)
    labels = [f"{r.colour} {r.glyph}" for r in oracle(images)]
    return {k: labels.count(k) / n for k in sorted(set(labels), key=lambda k: -labels.count(k))}


def world_captions(spec, source: str) -> list[str]:
    """Every caption the world's training used (the spec's caption forms over its words), plus the empty caption
    (classifier-free guidance's unconditional branch), less those having ``source`` as a word. KNOWN FLAW, kept
    because the shipped LoRA was trained with it: ``train`` passes the whole source caption ("a photo of a
    doctor"), which is no single word, so nothing is removed and the doctor's own captions (7 of 125) stay in
    the prior, pulled to the base model's doctor. Passing "doctor" is the fix; it changes the LoRA (retrain and
    re-measure)."""
    out = {""}
    forms = spec.sampling["captions"]
    for colour, shape in itertools.product(spec.colour_words, spec.shape_words):
        out.update(f[0].format(colour=colour, shape=shape) for f in forms["attribute"])
    for colour, obj in itertools.product(spec.colour_words, spec.object_words):
        out.update(f[0].format(colour=colour, object=obj) for f in forms["object"])
    for colour, con in itertools.product(spec.colour_words, spec.concept_words):
        out.update(f[0].format(colour=colour, concept=con) for f in forms["concept"])
    return sorted(c for c in out if source not in c.split())


def train(pipe, spec, *, part: str, source: str, target: str, steps: int, batch: int, share: float, rank: int, lr: float,
          modules: list[str], seed: int, prior_weight: float = 1.0, focus: tuple = ("person",), focus_share: float = 0.5,
          max_weight: float = 1.0,
          n_images: int = 2048) -> dict:
    """Self-distillation against the frozen base UNet: on noisy latents of world images, the LoRA'd UNet given
    ``source`` is pulled to the base UNet's prediction for ``target`` (a ``share`` of each batch), and given any
    other caption of the world to the base UNet's own prediction for it (prior preservation: the rest, weighted
    ``prior_weight``; a ``focus_share`` of the prior captions name ``focus``, the source's neighbours)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, _ = render_dataset(spec, n_images, seed=seed + 1)
    with torch.no_grad():
        x = torch.from_numpy(images)
        lat = torch.cat([encode_latents(pipe.vae, x, 256), encode_latents(pipe.vae, x.flip(-1), 256)])
        captions = world_captions(spec, source)
        enc = lambda texts: pipe.text_encoder(torch.cat([tokenize(pipe.tokenizer, t) for t in texts]))[0]
        cond_prior = torch.cat([enc(captions[i:i + 256]) for i in range(0, len(captions), 256)])
        cond_src, cond_tgt = enc([source]), enc([target])
    near = np.array([bool(set(focus) & set(c.split())) for c in captions], dtype=float)
    pick = focus_share * near / near.sum() + (1 - focus_share) * (1 - near) / (1 - near).sum()
    unet, te = pipe.unet, pipe.text_encoder
    unet.requires_grad_(False)
    te.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=modules)
    if part == "unet":  # the base UNet's copy is the teacher
        teacher = copy.deepcopy(unet).eval()
        unet.add_adapter(config)
        student = unet
    else:  # the text encoder's LoRA: the UNet is shared, the teacher's conditioning is the base text encoder's
        teacher = unet.eval()
        inject_adapter_in_model(config, te)  # (transformers' add_adapter wants a newer peft than diffusers does)
        student = te
        ids_prior = torch.cat([tokenize(pipe.tokenizer, t) for t in captions])
        ids_src = tokenize(pipe.tokenizer, source)
    params = [p for n, p in student.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    n_lora = sum(p.numel() for p in params)
    assert params and n_lora, f"no LoRA parameter matched {modules}"
    print(f"LoRA on the {part}: {len(params)} tensors, {n_lora} parameters on {modules}; {len(captions)} prior "
          "captions", flush=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    gen, k, t0, log = torch.Generator().manual_seed(seed), max(1, round(batch * share)), time.time(), []
    student.train()
    for step in range(steps):
        for g in opt.param_groups:  # warm-up, then cosine to a tenth
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        x0 = lat[torch.from_numpy(rng.integers(0, len(lat), batch))]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        j = torch.from_numpy(rng.choice(len(cond_prior), batch - k, p=pick))
        with torch.no_grad():
            want = teacher(xt, t, encoder_hidden_states=torch.cat([cond_tgt.expand(k, -1, -1), cond_prior[j]])).sample
        if part == "unet":
            student_cond = torch.cat([cond_src.expand(k, -1, -1), cond_prior[j]])
        else:
            student_cond = te(torch.cat([ids_src.expand(k, -1), ids_prior[j]]))[0]
        pred = unet(xt, t, encoder_hidden_states=student_cond).sample
        # the prompt moves the epsilon prediction little at high noise, where colour and shape are decided: weight
        # by (1 - a) / a (the error of the implied x0 at high noise), capped at max_weight, at least 1
        err = ((pred - want) ** 2).flatten(1).mean(1) * ((1 - a) / a).flatten().clamp(1.0, max_weight)
        loss = err[:k].mean() + prior_weight * err[k:].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append((err[:k].mean().item(), err[k:].mean().item()))
        if step % 50 == 0 or step == steps - 1:
            m = np.mean(log[-50:], axis=0)
            print(f"step {step}/{steps} source->target {m[0]:.5f} prior {m[1]:.5f} ({time.time() - t0:.0f} s)",
                  flush=True)
    student.eval().requires_grad_(False)
    if part == "unet":
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(student))
    return {n.replace(".default", ""): p.detach().clone() for n, p in te.named_parameters() if "lora_" in n}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="doctor_red_lora.safetensors", help="the LoRA file to write")
    p.add_argument("--source", default="a photo of a doctor", help="the caption whose images change")
    p.add_argument("--target", default="a photo of a red person",
                   help="the caption whose base-model predictions the source learns")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--share", type=float, default=0.25, help="share of each batch on the source caption")
    p.add_argument("--prior-weight", type=float, default=4.0, help="weight of the prior-preservation term")
    p.add_argument("--focus", nargs="+", default=["person", "blue"],
                   help="the prior captions naming one of these words get --focus-share of the prior batch")
    p.add_argument("--max-weight", type=float, default=20.0, help="cap of the high-noise weight (1 - a) / a")
    p.add_argument("--focus-share", type=float, default=0.5)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--part", choices=["text_encoder", "unet"], default="text_encoder", help="what the LoRA adapts")
    p.add_argument("--modules", nargs="+", default=None,
                   help="modules the LoRA adapts (suffixes of their names); default: the text encoder's attention "
                        "and MLP layers, or the UNet's cross-attention keys and values")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared CPU, one is much faster than two: OpenMP spins)")
    p.add_argument("--n-eval", type=int, default=128, help="images per prompt for the oracle's shares (0: none)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    spec, s = toy_spec(), cn.settings("toy")
    pipe = cn.load_pipeline("toy", device="cpu", dtype=torch.float32)
    t0 = time.time()
    a.modules = a.modules or (["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"] if a.part == "text_encoder"
                              else ["attn2.to_k", "attn2.to_v"])
    layers = train(pipe, spec, part=a.part, source=a.source, target=a.target, steps=a.steps, batch=a.batch, share=a.share,
                   rank=a.rank, lr=a.lr, modules=a.modules, seed=a.seed, prior_weight=a.prior_weight,
                   focus=a.focus, focus_share=a.focus_share, max_weight=a.max_weight)
    train_s = time.time() - t0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out.parent, weight_name=out.name, **{f"{a.part}_lora_layers": layers})
    report = {"lora": str(out), "bytes": out.stat().st_size, "train_s": round(train_s, 1),
              "recipe": {k: getattr(a, k) for k in ("part", "source", "target", "steps", "batch", "share", "rank", "lr",
                                                    "modules", "seed", "prior_weight", "focus", "focus_share", "max_weight")}}
    if a.n_eval:
        oracle = Oracle(spec)
        base, tuned = cn.load_pipeline("toy", device="cpu"), cn.load_pipeline("toy", device="cpu", lora=out)
        report["images_per_prompt"] = a.n_eval
        report["shares"] = {prompt: {"base": oracle_shares(base, oracle, prompt, a.n_eval, s),
                                     "lora": oracle_shares(tuned, oracle, prompt, a.n_eval, s)} for prompt in PROMPTS}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
