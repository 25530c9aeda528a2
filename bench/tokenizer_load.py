"""How long loading the offline GPT-OSS tokenizer takes (``AutoTokenizer.from_pretrained``), with its
``tokenizer_config.json`` as the build writes it (special tokens listed in ``added_tokens_decoder``)
and without that list (the build before c59451a), each load in a fresh process as a grading or
training process does it; checks both give the same encodings.

    .venv/bin/python bench/tokenizer_load.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOAD = """
import json, sys, time
t = time.perf_counter()
from transformers import AutoTokenizer
t1 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
t2 = time.perf_counter()
text = "<|start|>user<|message|>What is a stack? naive cafe \\u65e5\\u672c<|end|><|return|>"
print(json.dumps({"load_s": t2 - t1, "ids": tok.encode(text), "specials": tok.all_special_tokens, "n": len(tok)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from data.tokenizer_offline import build_gpt_oss_tokenizer

    built = build_gpt_oss_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "without-list"
        shutil.copytree(built, old)
        cfg = json.loads((old / "tokenizer_config.json").read_text())
        cfg.pop("added_tokens_decoder", None)
        (old / "tokenizer_config.json").write_text(json.dumps(cfg))
        results = {}
        for name, folder in (("as built", built), ("without added_tokens_decoder", old)):
            runs = [json.loads(subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True,
                                              text=True, check=True).stdout.strip().splitlines()[-1])
                    for _ in range(args.repeats)]
            results[name] = runs
            each = ", ".join(f"{r['load_s']:.2f}" for r in runs)
            print(f"{name}: load {statistics.median(r['load_s'] for r in runs):.2f} s (median of {args.repeats}; {each})")
        a, b = (results[k][0] for k in results)
        same = a["ids"] == b["ids"] and a["specials"] == b["specials"] and a["n"] == b["n"]
        print(f"same encodings, special tokens and size: {same}")
        print("command: .venv/bin/python bench/tokenizer_load.py --repeats", args.repeats)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
