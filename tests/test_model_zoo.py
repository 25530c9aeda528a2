"""Embedded models load with stock transformers from local folders: the tiny GPT-OSS (the whole
GPT-OSS LoRA path in seconds) and the default CPU model, Gemma 3 270M."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from data.model_zoo import (
    DEFAULT_CPU_MODEL,
    EMBEDDED,
    ModelNotFoundError,
    build_tiny_gpt_oss,
    embedded_gemma_dir,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def tiny(tiny_gpt_oss_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_gpt_oss_dir), AutoTokenizer.from_pretrained(tiny_gpt_oss_dir)


def test_tiny_gpt_oss_is_a_gpt_oss_with_the_real_tokenizer(tiny, tiny_gpt_oss_dir: Path) -> None:
    model, tok = tiny
    cfg = model.config
    assert cfg.model_type == "gpt_oss" and type(model).__name__ == "GptOssForCausalLM"
    assert cfg.vocab_size == len(tok) == 201088
    assert cfg.num_local_experts == 4 and cfg.num_experts_per_tok == 2 and cfg.num_hidden_layers == 2
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    assert model.dtype == torch.float32
    assert (tiny_gpt_oss_dir / "model.safetensors").is_file()
    assert tok.eos_token == "<|return|>"
    ids = torch.tensor([tok.encode("<|start|>user<|message|>hello<|end|>")])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 201088) and torch.isfinite(logits).all()


def test_tiny_gpt_oss_is_deterministic_and_cached(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = build_tiny_gpt_oss(tmp_path / "a", hidden_size=32, num_layers=1, seed=3)
    b = build_tiny_gpt_oss(tmp_path / "b", hidden_size=32, num_layers=1, seed=3)
    c = build_tiny_gpt_oss(tmp_path / "c", hidden_size=32, num_layers=1, seed=4)
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.layers.0.self_attn.q_proj.weight"], wc["model.layers.0.self_attn.q_proj.weight"])
    before = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_gpt_oss(a, hidden_size=32, num_layers=1, seed=3) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == before  # cached, not rebuilt


def test_lora_on_attention_and_experts_trains_saves_and_reloads(tiny, tiny_gpt_oss_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    _, tok = tiny
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss_dir)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in trainable) and any("experts" in n for n in trainable)

    ids = torch.tensor([tok.encode('{"items":[{"question":"1","score":3,"max_score":5}],"score":3}')])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_parameters"] and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt_oss_dir), tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad():
        got = reloaded(ids).logits
    assert torch.equal(got, want)


def test_resolve_model_path(tiny_gpt_oss_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_path("embedded:tiny-gpt-oss") == tiny_gpt_oss_dir
    assert resolve_model_path(str(tiny_gpt_oss_dir)) == tiny_gpt_oss_dir
    assert set(EMBEDDED) == {"gemma-3-270m", "tiny-gpt-oss"}
    with pytest.raises(ModelNotFoundError, match="embedded:gemma-3-270m"):
        resolve_model_path("embedded:llama-9000")
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        resolve_model_path("openai/no-such-model-here")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_default_cpu_model_is_gemma_and_loads_offline() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert DEFAULT_CPU_MODEL == "embedded:gemma-3-270m"
    folder = resolve_model_path(DEFAULT_CPU_MODEL)
    assert folder == embedded_gemma_dir()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # plain fp32 weights, trainable with LoRA
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32 and 250e6 < model.num_parameters() < 300e6
    # Real weights, not random: natural English is far likelier than the same tokens shuffled.
    text = "The quick brown fox jumps over the lazy dog. Water boils at one hundred degrees Celsius."
    ids = torch.tensor([tok.encode(text)])
    shuffled = torch.cat([ids[:, :1], ids[:, 1:][:, torch.randperm(ids.shape[1] - 1, generator=torch.Generator().manual_seed(0))]], 1)
    with torch.no_grad():
        natural_loss = model(ids, labels=ids).loss.item()
        shuffled_loss = model(shuffled, labels=shuffled).loss.item()
    assert natural_loss < 5.0 and shuffled_loss > natural_loss + 3.0


def test_the_gemma_conversion_parses_its_gguf_once(tmp_path: Path) -> None:
    """transformers reads the GGUF three times (tokenizer, config, weights), each a fresh
    ``from gguf import GGUFReader``; during the conversion they share one parse of a file (the
    first start took 93 s here, 54 s with it), and outside it every reader is new again."""
    import gguf
    import numpy as np

    from data.model_zoo import _gguf_parsed_once

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("w", np.arange(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def read():
        from gguf import GGUFReader  # as transformers' load_gguf_checkpoint imports it, per call

        return GGUFReader(path)

    with _gguf_parsed_once():
        first = read()
        assert read() is first and gguf.GGUFReader(str(path)) is first  # a str path is the same file
        tokens = first.fields["tokenizer.ggml.tokens"]
        assert [bytes(tokens.parts[i]).decode() for i in tokens.data] == ["a", "b", "c"]
    assert read() is not first and read() is not read()



_RANK_BUILD = r"""
import os, sys, json
import torch.distributed as dist
dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2, init_method="tcp://127.0.0.1:" + sys.argv[2])
from data import model_zoo
out = sys.argv[3]
result = {}
if dist.get_rank() == 1:  # the rank transformers' save_pretrained writes nothing on
    try:
        model_zoo.build_tiny_gpt_oss(__import__("pathlib").Path(out))
        result["ok"] = True
    except RuntimeError as e:
        result["error"] = str(e)
dist.barrier()
print("RESULT " + json.dumps(result))
dist.destroy_process_group()
"""


def test_a_model_built_inside_a_process_group_is_never_stored_half_written(tmp_path, gpt_oss_tokenizer_dir):
    """On rank 1 of a torch.distributed group transformers' save_pretrained silently writes no
    weights; the build must then fail clearly and store nothing, never a folder marked finished."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "tiny"
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_BUILD, str(r), port, str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    rank1 = json.loads(outs[1][0].split("RESULT ", 1)[1])
    if rank1.get("ok"):  # a transformers that saves on every rank: then the folder must be whole
        assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    else:
        assert "rank 1" in rank1["error"] and "nothing was stored" in rank1["error"]
        assert not out.exists()
    assert not list(tmp_path.glob("tiny.tmp-*"))


def test_first_two_rank_run_on_a_fresh_cache_builds_the_embedded_model_once_and_trains(tmp_path, gpt_oss_tokenizer_dir):
    """A new machine: the cache holds only the tokenizer; `python -m training run --preset smoke`
    (2 gloo ranks, both wanting embedded:tiny-gpt-oss) builds the model and finishes."""
    import shutil
    import subprocess
    import sys

    cache = tmp_path / "cache"
    shutil.copytree(gpt_oss_tokenizer_dir, cache / gpt_oss_tokenizer_dir.name)
    env = dict(os.environ, GRADER_CACHE=str(cache), GRADER_CHECKPOINTS=str(tmp_path / "ck"),
               GRADER_DB=str(tmp_path / "studio.db"))
    proc = subprocess.run([sys.executable, "-m", "training", "run", "--preset", "smoke", "--set", "max_steps=1",
                           "--set", "eval_fraction=0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished" in proc.stdout
    built = cache / "tiny-gpt-oss"
    assert (built / "config.json").is_file() and (built / "model.safetensors").is_file()
