"""Shared fixtures: stacks of real processes (a private Redis each), reference models, tiny models."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


def _stack(request, workers=None, **kw):
    """A stack of real processes; ``workers``: fields of every worker by flat name (``services.launcher.workers``)."""
    from services.launcher import StackConfig
    from services.launcher import workers as templates
    from tests.stack import RunningStack

    running = RunningStack(StackConfig(port=0, log_level="WARNING", **templates(**(workers or {})), **kw))
    request.addfinalizer(running.close)
    return running


def start_redis(password: str = ""):
    """A private redis-server on a free port of 127.0.0.1, answering pings; returns (process, url).
    With ``password``, the server requires it and the URL carries it."""
    import shutil
    import subprocess
    import time

    import redis

    from engine.parallel import free_port

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (`make test` installs it; or apt-get install redis-server)")
    port = free_port()
    auth = ["--requirepass", password] if password else []
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             *auth], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://{':' + password + '@' if password else ''}127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.time() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    client.close()
    return proc, url


@pytest.fixture(scope="session")
def _redis_server():
    """A private redis-server on a free port, shared by the session's tests."""
    proc, url = start_redis()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis_url(_redis_server):
    """The URL of an empty private Redis (flushed before each test)."""
    import redis

    with redis.Redis.from_url(_redis_server) as client:
        client.flushall()
    return _redis_server


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from tests.models import make_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="session")
def smollm2_stack(request):
    """The default model served by one prefill and one decode instance over UCX."""
    return _stack(request, model="", workers=dict(kv_cache_bytes=256 << 20, threads=1))


@pytest.fixture(scope="session")
def tiny_stack(request, tiny_llama_dir):
    """A tiny random Llama (safetensors) served with the TCP transport and a small KV cache:
    47 usable blocks of 8 tokens = 376 token slots, less than the 512-token context."""
    return _stack(request, model=tiny_llama_dir,
                  workers=dict(transport="tcp", num_blocks=48, block_size=8, threads=1))


@pytest.fixture
def tiny(tiny_stack):
    """``tiny_stack``, checked to hold every KV block free again after the test."""
    before = tiny_stack.free_blocks()
    yield tiny_stack
    assert tiny_stack.wait_free_blocks(before) == before, "KV blocks leaked"


@pytest.fixture
def client(tiny):
    """The official OpenAI client on ``tiny``'s HTTP API (no retries)."""
    import openai

    with openai.OpenAI(base_url=tiny.http_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' model and tokenizer for SmolLM2 (fp32), the correctness reference."""
    from engine.loader import load_reference_model, load_tokenizer, resolve_model

    source = resolve_model("")
    return load_reference_model(source), load_tokenizer(source)


def hf_generate(model, prompt_ids: list[int], max_new_tokens: int, logits: bool = False):
    """``transformers``' greedy continuation (fp32, this CPU): ``(tokens, each step's logits
    if asked, else None)``."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.generation_config.eos_token_id,
                             output_logits=logits, return_dict_in_generate=True)
    return (out.sequences[0, len(prompt_ids):].tolist(),
            [step[0] for step in out.logits] if logits else None)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """``transformers``' greedy tokens, the reference the end-to-end tests compare the stack's
    tokens with, exactly. Sound on any CPU because both sides compute in fp32 on the same
    machine and Cleave's logits stay within a few hundredths of the fp32 bound of
    ``tests.tolerances`` of these (measured by the parity tests, on every emulated ISA): a
    token could differ only where the top two logits are closer than that difference. Over
    hundreds of steps (or SmolLM2's long path) such a near-tie within the bound's own worst
    case does occur, so the bound-based check (``tests.engine.test_parity.reference_greedy``)
    is asserted by the parity tests, on their prompts, not here."""
    return hf_generate(model, prompt_ids, max_new_tokens)[0]


def run_plan(*argv) -> tuple[int, str]:
    """``cleave plan ARGV``: (exit code, what it printed)."""
    import contextlib
    import io

    from services.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["plan", *argv])
    return code, out.getvalue()
