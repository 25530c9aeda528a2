"""How far compiled GPT-OSS layers in bf16 sit from fp32, by variant (GPU; CPU runs the eager rows).

The tiny top-4 GPT-OSS of tests/test_gpu_fast_path.py with attention LoRA; each row is one way of
running the same two training steps (project loss, full or no recomputation), judged by the loss
and by the relative distance of all LoRA gradients from fp32 on the CPU ("whole"), with the three
worst tensors.  It found (H200, torch 2.11) that compiling a whole transformers-5 decoder layer,
whose forward checkpoints itself, puts torch.utils.checkpoint inside the graph, and with flex
attention and the experts in that graph the grads land 26% from fp32 against eager's 1.7%;
fast_path.compile_layers now checkpoints in eager around the compiled forward.  The row
"whole layer compiled, checkpoint traced" rebuilds the old structure, to see whether a newer torch
still shows it.

    python bench/compiled_gap.py                      # every row
    python bench/compiled_gap.py "eager" "compiled"   # rows by exact name
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.bf16_judge import rel, whole_rel  # noqa: E402
from tests.test_gpu_fast_path import (_same_lora, batch_for, fp32_copy_of, lora, loss_and_grads,  # noqa: E402
                                      project, stock, tiny_gpt_oss)
from training import fast_path  # noqa: E402
from training.config import RunConfig  # noqa: E402

CPU = torch.device("cpu")


def main(names: list[str]) -> None:
    model = tiny_gpt_oss(top_k=4)
    ref32 = fp32_copy_of(model, top_k=4)
    pm, ref = lora(model, experts=False, r=8), lora(ref32, experts=False, r=8)
    _same_lora(ref, pm)
    batch = batch_for(pm.config.vocab_size)
    l32, g32 = loss_and_grads(ref, {k: v.to(CPU) for k, v in batch.items()}, stock)
    lm = fast_path.base_causal_lm(pm)

    def row(name, *, compile_="product", attn="flex_attention", recompute="full"):
        if names and name not in names:
            return
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        fast_path.compile_layers(pm, enable=False)
        fast_path.apply(pm, RunConfig(compile_layers=False), force=True)
        if not fast_path._set_attn(lm, attn) or (attn == "flex_attention" and not torch.cuda.is_available()):
            print(f"GAP {name}: skipped (flex attention with sinks needs a GPU)")
            return
        fast_path.set_recompute(pm, recompute)
        pm.train()
        if compile_ == "product":
            fast_path.compile_layers(pm)
        elif compile_ == "whole layer":  # before the fix: the checkpointing wrapper traced too
            for layer in lm.model.layers:
                layer.compile()
        loss, g = [loss_and_grads(pm, batch, project) for _ in range(2)][-1]
        worst = sorted(((rel(g[k], g32[k]), k) for k in g32), reverse=True)[:3]
        c = torch._dynamo.utils.counters
        print(f"GAP {name:44s} loss {loss:.5f} (fp32 {l32:.5f}) whole {whole_rel(g, g32):.4f} worst "
              + ", ".join(f"{k.split('layers.')[-1].replace('.default.weight', '')}={e:.3f}" for e, k in worst)
              + (f" | graphs {c['stats']['unique_graphs']} breaks {sum(c['graph_break'].values())}" if compile_ else ""),
              flush=True)

    t = time.time()
    row("eager", compile_=None)
    row("eager, eager attention", compile_=None, attn="eager")
    row("compiled")
    row("compiled, no recomputation", recompute="none")
    row("compiled, eager attention", attn="eager")
    row("whole layer compiled, checkpoint traced", compile_="whole layer")
    fast_path.compile_layers(pm, enable=False)
    print(f"GAP done in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
