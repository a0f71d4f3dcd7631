"""References for parity tests: ``transformers``' logits, greedy tokens and log-probabilities on
the same weights (fp32, CPU), the bound ours must meet (``tests.tolerances``), and the
``LLMEngine`` config the parity runs use. Shared by the engine, layout and end-to-end tests.

Why token-exact parity is sound on any CPU: both sides compute in fp32 on the same machine, and
:func:`reference_greedy` asserts that at every step ``transformers``' top logit leads the
second by more than twice that bound (``tests.tolerances.assert_decisive``), so any path whose
logits are within the bound picks the same token.
"""
from __future__ import annotations

import torch

from engine.batch import ForwardBatch
from engine.loader import load_reference_model
from engine.runtime.config import RuntimeConfig
from tests.conftest import hf_generate
from tests.tolerances import assert_close, assert_decisive, model_reduction_length, rtol


def prefill_last_logits(model, config, prompts, block_size=16):
    """Our last-position logits for a batch of prompts (one prefill step)."""
    per = [-(-len(p) // block_size) for p in prompts]
    starts = [sum(per[:i]) for i in range(len(per))]
    tables = [list(range(s, s + n)) for s, n in zip(starts, per)]
    kv = torch.zeros(config.num_layers, 2, sum(per), block_size, config.num_kv_heads, config.head_dim)
    with torch.inference_mode():
        return model(ForwardBatch.prefill(prompts, tables, block_size), kv)


def reference_last_logits(ref, prompt):
    with torch.inference_mode():
        return ref(torch.tensor([prompt])).logits[0, -1].float()


def reference_greedy(ref, prompt, n):
    """``transformers``' greedy tokens, each step's choice checked decisive (see the module
    doc): a token-exact comparison with them holds on any CPU."""
    tokens, steps = hf_generate(ref, prompt, n, logits=True)
    for i, logits in enumerate(steps):
        assert_decisive(logits, model_reduction_length(ref.config, len(prompt) + i),
                        f"transformers' step {i} after a {len(prompt)}-token prompt")
    return tokens


def assert_logits_close(ours, want, config, context):
    """Last-position logits of a ``context``-token prompt: within the fp32 bound of the
    model's reduction length, and the same argmax (decisive in ``want``)."""
    k = model_reduction_length(config, context)
    assert_close(ours, want, k=k)
    assert_decisive(want, k)
    assert int(ours.argmax()) == int(want.argmax())


def engine_config(source, block_size: int = 16, **kw) -> RuntimeConfig:
    """An ``LLMEngine``'s config for parity runs: CPU, fp32, a small cache, TCP transport."""
    return RuntimeConfig(model=str(source), device="cpu", dtype="float32", transport="tcp",
                         block_size=block_size, num_blocks=kw.pop("num_blocks", 256), **kw)


def reference_logprobs(model_dir: str, ids: list[int]) -> tuple[torch.Tensor, float]:
    """``[len(ids), vocab]`` log-probabilities ``transformers`` gives each next position (fp32),
    and how far another code path's may be from them (see the module docstring)."""
    ref = load_reference_model(model_dir)
    with torch.inference_mode():
        logits = ref(torch.tensor([ids])).logits[0].float()
    bound = rtol(torch.float32, model_reduction_length(ref.config, len(ids))) * float(logits.abs().max())
    return torch.log_softmax(logits, dim=-1), 2 * bound
