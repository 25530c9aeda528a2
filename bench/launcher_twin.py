"""A GPT-OSS twin checkpoint folder (random weights, MXFP4 layout) plus the offline tokenizer,
ready for `python -m training run --set model=<folder>`.

Uses bench/make_twin_checkpoint.py (its shapes and writer) and adds two knobs the launcher bench
needs: a layer count (a reduced 20b twin loads faster) and a tiny shape with the real vocabulary
(the CPU rehearsal of the same command).

    python bench/launcher_twin.py --shape 20b [--layers 24] --out /root/twin-20b [--device cuda]
    python bench/launcher_twin.py --shape tiny-vocab --out /tmp/twin-tiny --device cpu
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main(argv=None) -> int:
    import torch

    import make_twin_checkpoint as mt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="20b", choices=["20b", "120b", "tiny-vocab"])
    ap.add_argument("--layers", type=int, default=None, help="layer count (default: the shape's own)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)

    base, vocab = a.shape, None
    if a.shape == "tiny-vocab":
        base, vocab = "tiny", 201088  # the real tokenizer's ids must fit the embedding
    elif a.layers:
        n_layers, experts = mt.SHAPES[a.shape]
        mt.SHAPES[a.shape] = (a.layers, experts)
    t0 = time.perf_counter()
    info = mt.write_twin(base, Path(a.out), device=a.device, vocab_size=vocab)
    import shutil

    from data.tokenizer_offline import build_gpt_oss_tokenizer

    # The tokenizer is built in its own cache folder (build_gpt_oss_tokenizer replaces the folder
    # it is given, weights included), then its files are copied beside the weights.
    tok_dir = build_gpt_oss_tokenizer()
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, Path(a.out) / f.name)
    info.update(layers=json.loads((Path(a.out) / "config.json").read_text())["num_hidden_layers"],
                total_s=round(time.perf_counter() - t0, 2))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
