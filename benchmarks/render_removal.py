"""Prototype (issue 23, not part of the package): a render-based removal test. Per top token: renders of the pseudo-token with the token removed
(coefficient zeroed, rest rescaled) vs the full pseudo-token, on paired seeds; CLIP similarity of each render
to the held-out concept images' mean embedding. Compare with the oracle's drawn constituents.

    python benchmarks/render_removal.py SEED fruit,bass,doctor,sun,gem,leaf [THREADS] [OUT.json]

Results of 2026-12-05 (seeds 0-2, 6 concepts, top-10 tokens, 16 paired seeds, guidance 7.5, one-sided z > 1.645)
against the toy world's constituents: the fit's loss-based test supported 52 tokens, 25 right (48%, recall 25/45);
this render/centroid test 49, 29 right (59%, recall 29/45); the render/coverage variant 67, 32 right (48%, 32/45).
Better than the loss test, far from issue 23's targets, so it was not shipped."""
import sys, json, time, torch
import conceptor_nb as cn
from conceptor_nb.method.fit import combine
from conceptor_nb.method.inject import token_embeddings, template_prompt
from conceptor_nb.method.generate import concept_images
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
seed = int(sys.argv[1]); concepts = sys.argv[2].split(",")
pipe = cn.load_pipeline("toy", device="cpu"); clip = cn.load_clip("toy", device="cpu")
S = cn.settings("toy").replace(seed=seed)
N, G = 16, 7.5   # paired render seeds per variant; guidance of the renders
out = {}
for c in concepts:
    t0 = time.time()
    dec = cn.decompose(pipe, f"a {c}", clip=clip, settings=S, verbose=False)
    n = dec.n_tokens
    test = concept_images(pipe, dec.prompt, 16, S.seed, split="test", steps=S.gen_steps, guidance=S.guidance, sampler=S.sampler, verbose=False)
    tf = clip.image_features(test); centroid = tf.mean(0)
    emb = token_embeddings(pipe, dec.token_ids[:n]); coef = torch.tensor(dec.coefficients[:n])
    seeds = [10_000_000 + S.seed * 1000 + i for i in range(N)]

    def sims(cf):  # per render: similarity to the centroid; per held-out image: its best match among the renders
        imgs = cn.generate(pipe, template_prompt(dec.template), seeds, pseudo=combine(cf, emb, dec.norm), template=dec.template,
                           steps=S.gen_steps, guidance=G, sampler=S.sampler, verbose=False, batch_size=64)
        f = clip.image_features(imgs)
        return f @ centroid, (tf @ f.T).max(1).values

    full, fcov = sims(coef)
    res = {"centroid": [], "coverage": []}
    for j in range(n):
        a, b = sims(coef.index_fill(0, torch.tensor([j]), 0.0))
        for key, d in (("centroid", full - a), ("coverage", fcov - b)):
            res[key].append((dec.tokens[j], float(d.mean()), float(d.std() / len(d) ** .5)))
    sup_loss = [t for t, s in zip(dec.tokens, dec.supported()) if s]
    out[c] = dict(top=dec.tokens[:n], loss_supported=sup_loss, render=res)
    print(f"== {c} seed {seed} ({time.time()-t0:.0f}s) top: {' '.join(dec.tokens[:n])}")
    print(f"   loss-test supported: {sup_loss}")
    for g, rows in res.items():
        print(f"   render test ({g}): supported {[t for t, m, e in rows if m > 1.645 * e]}")
        print("     " + ", ".join(f"{t} {m*1000:+.0f}±{e*1000:.0f}" for t, m, e in rows))
    sys.stdout.flush()
json.dump(out, open(sys.argv[4] if len(sys.argv) > 4 else f"render_{seed}.json", "w"))
