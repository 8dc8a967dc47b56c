"""SD 2.1-base at full shapes (random weights in a fake HF cache) on one CUDA GPU: generation s/image, fit ms/step,
validation cost, peak memory, vocabulary embedding time. `python scripts/sd_gpu_check.py` (writes $OUT/bench.json or ./bench.json).
SMOKE=1: the same calls on the CPU with shrunk weights and tiny sizes (a minute; nothing measured), so the script is known
to run before device time is spent on it (tests/test_sd.py runs it, slow set)."""
import json, os, sys, time  # noqa: E401
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
t00 = time.time()
import torch
import fakehub
SMOKE = bool(os.environ.get("SMOKE"))
DEV, N, STEPS = ("cpu", 2, 2) if SMOKE else ("cuda", 8, 50)  # device, images per timing, sampling steps
home = os.environ.get("FAKE_HF_HOME", "/tmp/hf_fake_smoke" if SMOKE else "/tmp/hf_fake_full")
res = {}
t0 = time.time()
fakehub.build(home, [fakehub.SD21_BASE], shrink=SMOKE, variants=("fp16",))
fakehub.build(home, [fakehub.CLIP_B32], shrink=SMOKE)
res["build_s"] = time.time() - t0
os.environ["HF_HOME"] = home; os.environ["HF_HUB_OFFLINE"] = "1"; os.environ.setdefault("CONCEPTOR_CACHE", "/tmp/cc")
from conceptor_nb import load_pipeline, load_clip
from conceptor_nb.config import settings
from conceptor_nb.config import TEMPLATE
from conceptor_nb.method import fit as C
from conceptor_nb.method.generate import generate
from conceptor_nb.method.vocab import template_features, word_token_ids
t0 = time.time()
pipe = load_pipeline(fakehub.SD21_BASE, device=DEV)
clip = load_clip(fakehub.CLIP_B32, device=DEV)
res["load_s"] = time.time() - t0; res["dtype"] = str(pipe.unet.dtype)
def sync(): DEV == "cuda" and torch.cuda.synchronize()
def out(): json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "bench.json"), "w"), indent=1); print(json.dumps(res), flush=True)
# generation: 8 images, LMS, 50 steps, guidance 7.5 (the concept images)
generate(pipe, "a photo of a dog", [0], steps=2, sampler="lms", verbose=False); sync()
t0 = time.time(); generate(pipe, "a photo of a dog", list(range(N)), steps=STEPS, guidance=7.5, sampler="lms", batch_size=8, verbose=False); sync()
res["gen_lms50_s_per_image"] = (time.time() - t0) / N; out()
# fit steps, batch 6, authors' settings
s = settings("sd").replace(steps=2 if SMOKE else 12, batch_size=6, val_every=0)
side = pipe.unet.config.sample_size * pipe.vae_scale_factor  # 512 px at full shapes
imgs = torch.rand(12, 3, side, side)
DEV == "cuda" and torch.cuda.reset_peak_memory_stats()
coef, h = C.fit(pipe, imgs, list(range(1000, 6000)), s, verbose=False); sync()
res["fit_step_ms_mean12"] = h["timings"]["step_ms"]; res["fit_autocast"] = h["autocast"]
res["fit_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None
res["loss_finite"] = all(map(lambda x: x == x, h["loss"])); out()
# validation: 20 images, DPM 50 steps, + CLIP scoring
t0 = time.time(); r = generate(pipe, "a photo of a sks", list(range(N if SMOKE else 20)), steps=STEPS, guidance=7.5, sampler="dpm", batch_size=8, verbose=False); clip.image_features(r); sync()
res["validation_20img_dpm50_s"] = time.time() - t0; out()
# vocabulary embedding, ViT-B/32 text tower, full vocab x 1 template (x27 for the authors')
ids = word_token_ids(clip.tokenizer)[: 512 if SMOKE else None]
t0 = time.time(); template_features(clip, TEMPLATE, ids); sync()
res["vocab_one_template_s"] = time.time() - t0
res["total_s"] = time.time() - t00; out()
