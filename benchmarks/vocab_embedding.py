"""The one-time vocabulary embedding (``conceptor_nb.method.vocab.vocab_text_features``) on this machine's CPU.

CLIP ViT-B/32's text encoder with the real shapes (config from ``tests/fixtures/hub_configs``) and random
weights (no checkpoint can be downloaded here), the real tokenizer and the authors' 27 templates
(``config.CLIP_TEMPLATES``). Prints and (``--markdown``) writes:

* time per template for ``--tokens`` tokens (a few templates), for
  ``fp32-before`` (the prefix-cached pass with the whole last layer, as before),
  ``fp32`` (the last layer runs the EOS query only) and ``bf16`` (bf16 autocast);
* the extrapolated time of the full embedding (49,406 tokens x 27 templates), the FLOP count
  (counted from the shapes) and the achieved GFLOP/s;
* fp32 against bf16 (``--agree-tokens``, ``--agree-templates``): cosine of each token's features, the
  overlap of the top-5000 tokens ranked against random unit targets and against text-derived targets;
* a GPU estimate from the FLOP count (an estimate: no GPU was measured).

    python benchmarks/vocab_embedding.py --tokens 4096 --templates 3 --markdown benchmarks/vocab_embedding.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from conceptor_nb.config import CLIP_TEMPLATES  # noqa: E402
from conceptor_nb.method.vocab import cpu_has_native_bf16  # noqa: E402
from conceptor_nb.method.vocab import (_template_parts, layer_weights, template_features, vocab_text_features,  # noqa: E402
                                        word_token_ids)

CONFIG = ROOT / "tests" / "fixtures" / "hub_configs" / "openai" / "clip-vit-base-patch32" / "config.json"
TOKENIZER = ROOT / "conceptor_nb" / "data" / "clip_tokenizer"
BEFORE = "9eb5203"  # the commit before this benchmark: prefix-cached, whole last layer, separate q, k, v products
SDPA = "8f8f131"  # the commit before the prefix attention as two dense products (a fused attention call, 8192 prompts a pass)
MODES = {"fp32-before": dict(before=BEFORE),
         "fp32-sdpa": dict(before=SDPA, precision="fp32", eos_only_last=True),
         "bf16-sdpa": dict(before=SDPA, precision="bf16", eos_only_last=True),
         "fp32": dict(precision="fp32", eos_only_last=True),
         "bf16": dict(precision="bf16", eos_only_last=True)}
# dense bf16 tensor-core peak of an H100/H200 SXM (the two have the same compute), FLOP/s
H100_BF16_PEAK = 989e12
H100_FP32_PEAK = 67e12  # its float32 peak without tensor cores (what fp32 runs in by default)
GPU_FRACTION = 0.3


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_clip(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    cfg = json.loads(CONFIG.read_text())
    text = CLIPTextConfig(**{"projection_dim": cfg.get("projection_dim", 512), **cfg["text_config"]})
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(text).eval()
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER))
    return SimpleNamespace(model=model, tokenizer=tok, device=torch.device("cpu"), name="clip-vit-base-patch32 (random)"), text


def flops_per_prompt(cfg, prefix_len: int, suffix_len: int, eos_only_last: bool) -> float:
    """Multiply-adds x 2 of one prompt's own positions (the prefix is computed once per template)."""
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    full = 2 * (4 * d * d + 2 * d * ff)  # q, k, v, out projections and the MLP, one position
    kv = 2 * (2 * d * d)
    total = 0.0
    for i in range(layers):
        last = eos_only_last and i == layers - 1
        for j in range(suffix_len):
            ctx = prefix_len + j + 1  # keys this position's query sees
            if last and j < suffix_len - 1:
                total += kv
            else:
                total += full + 2 * 2 * d * ctx  # + scores and weighted values
    return total + 2 * d * cfg.projection_dim


def full_flops(cfg, tok, templates, n_tokens: int, eos_only_last: bool) -> float:
    total = 0.0
    for t in templates:
        pre, post = _template_parts(tok, t)
        total += n_tokens * flops_per_prompt(cfg, len(pre), 1 + len(post), eos_only_last)
    return total


def before_module(commit: str = BEFORE):
    """The vocabulary embedding (``conceptor_nb/dictionary.py`` then) as it was at ``commit`` (read with git), to time it on the same model."""
    import importlib.util
    import subprocess

    src = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{commit}:conceptor_nb/dictionary.py"],
                                  stderr=subprocess.DEVNULL)
    spec = importlib.util.spec_from_loader(f"conceptor_nb._dictionary_{commit}", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "conceptor_nb"
    sys.modules[spec.name] = mod  # (its dataclass looks itself up there)
    exec(compile(src, f"{commit}:conceptor_nb/dictionary.py", "exec"), mod.__dict__)
    return mod


def gemm_rate(dtype, rounds: int = 5) -> float:
    """FLOP/s of one of the encoder's products alone (16384 x 512 by 512 x 2048: 8192 prompts x 2 positions
    through the first MLP matrix), the fastest of ``rounds``: the hardware's rate for this shape, right now."""
    x, w = torch.randn(16384, 512, dtype=dtype), torch.randn(2048, 512, dtype=dtype)
    F.linear(x, w)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * 16384 * 512 * 2048 / best


def timed(clip, templates, ids, modes, rounds: int) -> dict:
    """Seconds per template for each mode: the modes interleaved, ``rounds`` times, the fastest of the rounds
    (the machine is shared: the minimum is the least disturbed)."""
    fns, prep = {}, {m: 0.0 for m in modes}
    for mode in modes:
        kw = dict(MODES[mode])
        commit = kw.pop("before", None)
        mod = before_module(commit) if commit else None
        fn = mod.template_features if mod else template_features
        if "precision" in kw:  # the layers' weights are made once per vocabulary embedding (timed apart, in prep_s)
            t0 = time.perf_counter()
            kw["weights"] = (mod or sys.modules[template_features.__module__]).layer_weights(
                clip.model, torch.bfloat16 if kw["precision"] == "bf16" else torch.float32)
            prep[mode] = time.perf_counter() - t0
        fns[mode] = (fn, kw)
        fn(clip, templates[0], ids[:256], **kw)  # warm-up
    best = {m: [float("inf")] * len(templates) for m in modes}
    for _ in range(rounds):
        for mode, (fn, kw) in fns.items():
            for j, t in enumerate(templates):
                t0 = time.perf_counter()
                fn(clip, t, ids, **kw)
                best[mode][j] = min(best[mode][j], time.perf_counter() - t0)
    return best, prep


def agreement(clip, ids, templates, n_targets: int, top: int, seed: int = 0) -> dict:
    def feats(precision):
        total = sum(template_features(clip, t, ids, precision=precision) for t in templates)
        return F.normalize(total, dim=-1)

    t0 = time.perf_counter()
    a = feats("fp32")
    t_fp32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = feats("bf16")
    t_bf16 = time.perf_counter() - t0
    cos = (a * b).sum(-1)
    g = torch.Generator().manual_seed(seed)
    rand = F.normalize(torch.randn(n_targets, a.shape[1], generator=g), dim=-1)
    # text-derived targets: the mean of 10 random tokens' fp32 features plus as much random noise, as an image
    # embedding of a concept sits near several words' embeddings without being any of them
    picks = torch.randint(0, len(a), (n_targets, 10), generator=g)
    mix = F.normalize(a[picks].mean(1), dim=-1)
    textish = F.normalize(mix + F.normalize(torch.randn(n_targets, a.shape[1], generator=g), dim=-1), dim=-1)
    res = dict(tokens=len(ids), templates=len(templates), top=top, t_fp32_s=t_fp32, t_bf16_s=t_bf16,
               cos_min=float(cos.min()), cos_p01=float(cos.quantile(0.01)), cos_mean=float(cos.mean()))
    for name, targets in (("random", rand), ("text-derived", textish)):
        overlaps, top50, spread, err = [], [], [], []
        for v in targets:
            sa, sb = a @ v, b @ v
            ia, ib = set(sa.topk(top).indices.tolist()), set(sb.topk(top).indices.tolist())
            overlaps.append(len(ia & ib) / top)
            ja, jb = set(sa.topk(50).indices.tolist()), set(sb.topk(50).indices.tolist())
            top50.append(len(ja & jb) / 50)
            spread.append(float(sa.std()))
            err.append(float((sa - sb).abs().mean()))
        res[name] = dict(overlap_top=overlaps, overlap_top50=top50, sim_std=sum(spread) / len(spread),
                         sim_abs_err=sum(err) / len(err))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per timed template")
    ap.add_argument("--templates", type=int, default=3, help="timed templates (the first K of the authors' 27)")
    ap.add_argument("--modes", default="fp32-before,fp32-sdpa,bf16-sdpa,fp32,bf16")
    ap.add_argument("--full", default=None, metavar="PRECISION[,PRECISION]",
                    help="also run the whole embedding (every token x the 27 templates, vocab_text_features, "
                         "uncached) in these precisions and time it: a measurement, not an extrapolation")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest is kept")
    ap.add_argument("--agree-tokens", type=int, default=0, help="tokens of the fp32/bf16 agreement (0: skip; "
                    "49406: the whole vocabulary)")
    ap.add_argument("--agree-templates", type=int, default=1)
    ap.add_argument("--agree-top", type=int, default=5000)
    ap.add_argument("--targets", type=int, default=5)
    ap.add_argument("--agreement-from", default=None, help="a --json file of an earlier run: its agreement "
                    "(measured apart: it takes minutes)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clip, cfg = build_clip()
    tok = clip.tokenizer
    all_ids = word_token_ids(tok)
    n_vocab, n_templates = len(all_ids), len(CLIP_TEMPLATES)
    ids = all_ids[torch.linspace(0, n_vocab - 1, args.tokens).long()]
    templates = CLIP_TEMPLATES[: args.templates]
    modes = [m for m in args.modes.split(",") if m]
    for mode in list(modes):
        commit = MODES[mode].get("before")
        if commit:
            try:
                before_module(commit)
            except Exception as err:  # no git checkout with that commit: time the rest
                print(f"skipping {mode} (commit {commit} not readable with git: {err})")
                modes.remove(mode)
    if "bf16" in modes and not cpu_has_native_bf16():
        print("note: this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated and slow")
    info = dict(cpu=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(),
                native_bf16=cpu_has_native_bf16(), loadavg_start=os.getloadavg()[0], tokens=args.tokens, rounds=args.rounds,
                templates=list(templates), date=time.strftime("%Y-%m-%d %H:%M"))
    rows = {}
    all_times, prep = timed(clip, templates, ids, modes, args.rounds)
    for mode in modes:
        times = all_times[mode]
        eos_only = MODES[mode].get("eos_only_last", False)
        per_token = sum(times) / (len(times) * args.tokens)
        fl_timed = full_flops(cfg, tok, templates, args.tokens, eos_only)
        fl_full = full_flops(cfg, tok, CLIP_TEMPLATES, n_vocab, eos_only)
        rows[mode] = dict(per_template_s=times, prep_s=prep[mode], full_min=(per_token * n_vocab * n_templates + prep[mode]) / 60,
                          gflops=fl_timed / sum(times) / 1e9, full_tflop=fl_full / 1e12)
        print(f"{mode:12s} per template ({args.tokens} tokens): " + ", ".join(f"{t:.2f}" for t in times)
              + f" s; full {n_vocab} x {n_templates}: {rows[mode]['full_min']:.1f} min; {rows[mode]['gflops']:.0f} GFLOP/s;"
              f" {rows[mode]['full_tflop']:.1f} TFLOP in all", flush=True)
    fl_all = full_flops(cfg, tok, CLIP_TEMPLATES, n_vocab, True)
    floor = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rate = gemm_rate(dt)
        floor[name] = dict(gemm_gflops=rate / 1e9, floor_min=fl_all / rate / 60)
        print(f"{name} product alone: {rate / 1e9:.0f} GFLOP/s; the full embedding at that rate (its floor): "
              f"{floor[name]['floor_min']:.1f} min", flush=True)
    full = {}
    for precision in [p for p in (args.full or "").split(",") if p]:
        t0 = time.perf_counter()
        feats = vocab_text_features(clip, CLIP_TEMPLATES, precision=precision, cache_dir=False, verbose=False)
        full[precision] = dict(minutes=(time.perf_counter() - t0) / 60, rows=int((feats.abs().sum(-1) > 0).sum()),
                               loadavg=os.getloadavg()[0])
        print(f"whole embedding, {precision}: {full[precision]['rows']} tokens x {n_templates} templates in "
              f"{full[precision]['minutes']:.1f} min (measured)", flush=True)
    info["loadavg_end"] = os.getloadavg()[0]
    agree = None
    if args.agree_tokens:
        aids = all_ids[torch.linspace(0, n_vocab - 1, min(args.agree_tokens, n_vocab)).long()]
        agree = agreement(clip, aids, CLIP_TEMPLATES[: args.agree_templates], args.targets, min(args.agree_top, len(aids)))
        print(json.dumps(agree, indent=1))
    elif args.agreement_from:
        agree = json.loads(Path(args.agreement_from).read_text())["agreement"]
    fl = full_flops(cfg, tok, CLIP_TEMPLATES, n_vocab, True)
    gpu_s = fl / (GPU_FRACTION * H100_BF16_PEAK)
    out = dict(info=info, modes=rows, floor=floor, full=full, agreement=agree, full_tflop=fl / 1e12,
               gpu_estimate_s=gpu_s)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(out, cfg))
    return out


def markdown(out, cfg) -> str:
    info, rows, agree = out["info"], out["modes"], out["agreement"]
    lines = ["# Vocabulary embedding: CLIP ViT-B/32 text encoder, 49,406 tokens x 27 templates", "",
             "Written by `python benchmarks/vocab_embedding.py` (see benchmarks/README.md). Real shapes "
             f"(width {cfg.hidden_size}, MLP {cfg.intermediate_size}, {cfg.num_hidden_layers} layers), random weights.", "",
             f"CPU `{info['cpu']}`, native bf16: {info['native_bf16']}, torch {info['torch']}, {info['threads']} threads, "
             f"load average {info['loadavg_start']:.1f} at the start and {info['loadavg_end']:.1f} at the end "
             f"(2 cores: above 2 the machine was shared with other jobs), {info['date']}.", "",
             f"{info['tokens']} tokens per template, templates: " + ", ".join(f"`{t}`" for t in info["templates"]) + ".", "",
             "| mode | s per template | full embedding (min, extrapolated) | GFLOP/s | TFLOP (full) |",
             "|---|---|---|---|---|"]
    for mode, r in rows.items():
        lines.append(f"| {mode} | {', '.join(f'{t:.2f}' for t in r['per_template_s'])} | {r['full_min']:.1f} | "
                     f"{r['gflops']:.0f} | {r['full_tflop']:.1f} |")
    lines += ["", "The encoder's largest product alone (16384 x 512 by 512 x 2048), measured right after, and the "
              "full embedding's FLOPs at that rate: the floor of each precision on this machine, at this load.", "",
              "| precision | GFLOP/s of the product alone | floor of the full embedding (min) |", "|---|---|---|"]
    for name, f in out["floor"].items():
        lines.append(f"| {name} | {f['gemm_gflops']:.0f} | {f['floor_min']:.1f} |")
    if out.get("full"):
        lines += ["", "The whole embedding, measured (every token x the 27 templates, `vocab_text_features`, uncached, "
                  "the default batch size for this device):", "", "| precision | minutes | tokens | load average at the end |",
                  "|---|---|---|---|"]
        for name, f in out["full"].items():
            lines.append(f"| {name} | {f['minutes']:.1f} | {f['rows']} | {f['loadavg']:.1f} |")
    if agree:
        lines += ["", f"## fp32 against bf16 ({agree['tokens']} tokens, {agree['templates']} template(s))", "",
                  f"Per-token cosine of the features: min {agree['cos_min']:.5f}, 1st percentile {agree['cos_p01']:.5f}, "
                  f"mean {agree['cos_mean']:.6f}. Time (measured apart, at that run's load): fp32 {agree['t_fp32_s']:.0f} s, bf16 {agree['t_bf16_s']:.0f} s.", "",
                  f"| targets | top-{agree['top']} overlap (each target) | top-50 overlap | std of the similarities | "
                  "mean abs. error of a similarity |", "|---|---|---|---|---|"]
        for name in ("random", "text-derived"):
            r = agree[name]
            lines.append(f"| {name} | {', '.join(f'{x:.3f}' for x in r['overlap_top'])} | "
                         f"{', '.join(f'{x:.2f}' for x in r['overlap_top50'])} | {r['sim_std']:.4f} | {r['sim_abs_err']:.5f} |")
    lines += ["", f"GPU estimate (not measured): {out['full_tflop']:.0f} TFLOP at "
              f"{GPU_FRACTION:.0%} of an H100/H200's dense bf16 peak ({H100_BF16_PEAK / 1e12:.0f} TFLOP/s) is "
              f"{out['gpu_estimate_s']:.1f} s of compute ({out['full_tflop'] * 1e12 / (GPU_FRACTION * H100_FP32_PEAK):.0f} s "
              f"in fp32 at {GPU_FRACTION:.0%} of its {H100_FP32_PEAK / 1e12:.0f} TFLOP/s); the CPU-side work per batch "
              "(tokenizing, Python, kernel launches, copying features back) comes on top: well under a minute in all, "
              "not measured (no GPU was lent).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
