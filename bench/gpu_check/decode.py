"""GPU check step: engine decode throughput on one device vs ``transformers`` generate.

Run by ``run.py`` (``python bench/gpu_check/decode.py --device cuda``): the engine-level stand-in
for the serving benchmark when the stack cannot run (no Redis on the machine). A random-weight
model of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads; built with the
machine's ``transformers``, so nothing is carried) in the device's default dtype (bf16 on CUDA);
on CPU the tiny test Llama. For each batch size: ``engine.llm_engine.LLMEngine.generate`` (the
serving executor and decode scheduler in this process) of ``--tokens`` new tokens per sequence
after ``--prompt`` prompt tokens (EOS ignored), CUDA graphs off and on, and ``transformers``'
``generate`` of the same batch. Rows give new tokens per second over the whole call (prefill
included) and the ratio to ``transformers``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from engine.llm_engine import LLMEngine  # noqa: E402
from engine.loader import load_model_config, load_reference_model, resolve_model  # noqa: E402
from engine.runtime.config import RuntimeConfig  # noqa: E402
from engine.runtime.device import resolve_device, resolve_dtype  # noqa: E402
from rows import emit, guard  # noqa: E402

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=2048,
                     rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.02)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_tps(path: str, prompts, tokens: int, device: torch.device, graphs: bool) -> float:
    cfg = RuntimeConfig(model=path, device=device.type, transport="tcp", cuda_graphs=graphs,
                        max_batch=len(prompts), num_blocks=len(prompts) * (2 + (len(prompts[0]) + tokens) // 16))
    with LLMEngine(cfg) as engine:
        engine.generate(prompts, 4, ignore_eos=True)                      # warm-up (and capture)
        _sync(device)
        start = time.perf_counter()
        out = engine.generate(prompts, tokens, ignore_eos=True)
        _sync(device)
    return sum(map(len, out)) / (time.perf_counter() - start)


def hf_tps(ref, prompts, tokens: int, device: torch.device) -> float:
    ids = torch.tensor(prompts, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        ref.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        _sync(device)
        start = time.perf_counter()
        out = ref.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        _sync(device)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--batches", default="")
    ap.add_argument("--tokens", type=int, default=0)
    ap.add_argument("--prompt", type=int, default=64)
    args = ap.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batches = [int(b) for b in (args.batches or ("1,8,32" if cuda else "1,4")).split(",")]
    tokens = args.tokens or (64 if cuda else 16)
    from tests.models import make_tiny_llama
    tmp = tempfile.TemporaryDirectory()
    shape = SMOLLM2_SHAPE if cuda else {}
    path = make_tiny_llama(os.path.join(tmp.name, "model"), seed=0, **shape)
    dtype = resolve_dtype("auto", device)
    config = load_model_config(resolve_model(path)).replace(dtype=dtype)
    ref = load_reference_model(path).to(device=device, dtype=config.torch_dtype)
    what = f"{'SmolLM2-135M-shaped' if cuda else 'tiny'} random Llama, {dtype}, {args.prompt}-token prompts, " \
           f"{tokens} new tokens"
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        prompts = torch.randint(3, config.vocab_size, (batch, args.prompt), generator=gen).tolist()
        with guard(f"decode batch {batch}"):
            base = hf_tps(ref, prompts, tokens, device)
            for graphs in (False, True):
                label = f"engine decode batch {batch}, CUDA graphs {'on' if graphs else 'off'}"
                if graphs and not cuda:
                    emit(label, "skip", "CUDA only")
                    continue
                tps = engine_tps(path, prompts, tokens, device, graphs)
                emit(label, "pass", f"{tps:.0f} tok/s = {tps / base:.2f}x transformers generate "
                                    f"({base:.0f} tok/s); {what}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
