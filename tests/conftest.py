"""Shared fixtures: stacks of real processes (a private Redis each), reference models, tiny models."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


def _stack(request, **kw):
    from services.launcher import StackConfig
    from tests.stack import RunningStack

    running = RunningStack(StackConfig(port=0, log_level="WARNING", **kw))
    request.addfinalizer(running.close)
    return running


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from tests.models import make_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="session")
def smollm2_stack(request):
    """The default model served by one prefill and one decode instance over UCX."""
    return _stack(request, model="", worker_args=("--kv-cache-mb", "256", "--threads", "1"))


@pytest.fixture(scope="session")
def tiny_stack(request, tiny_llama_dir):
    """A tiny random Llama (safetensors) served with the TCP transport and a small KV cache:
    47 usable blocks of 8 tokens = 376 token slots, less than the 512-token context."""
    return _stack(request, model=tiny_llama_dir,
                  worker_args=("--transport", "tcp", "--num-blocks", "48", "--block-size", "8",
                               "--threads", "1"))


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' model and tokenizer for SmolLM2 (fp32), the correctness reference."""
    from engine.loader import load_reference_model, load_tokenizer, resolve_model

    source = resolve_model("")
    return load_reference_model(source), load_tokenizer(source)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()
