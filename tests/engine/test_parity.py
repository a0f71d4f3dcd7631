"""Engine model vs Hugging Face ``transformers`` on the same weights (fp32, CPU).

Tiny seeded Llama directories (safetensors; ``unit``) and the embedded SmolLM2 GGUF
(``integration``): last-position logits within the fp32 bound of ``tests.tolerances`` for the
model's reduction length, greedy tokens of the serving path (``engine.llm_engine.LLMEngine``:
the executor's prefill, the decode scheduler's steps) equal to ``generate(do_sample=False)``
token for token, and a batch of prompts of different lengths (another block size) equal to each
prompt run alone. Also the loader's error paths.

Why token-exact parity is sound on any CPU: both sides compute in fp32 on the same machine, and
:func:`tests.parity.reference_greedy` asserts that at every step ``transformers``' top logit leads the
second by more than twice that bound (``tests.tolerances.assert_decisive``), so any path whose
logits are within the bound picks the same token. Exactness rests on that margin, not on the
two implementations rounding alike (they need not: other shapes, other kernels).
"""
from __future__ import annotations

import pytest
import torch

from engine.batch import ForwardBatch
from engine.loader import (ModelSource, load_model, load_reference_model, load_tokenizer,
                           resolve_model)
from engine.llm_engine import LLMEngine
from engine.model import LlamaForCausalLM
from tests.models import make_tiny_llama
from tests.parity import (assert_logits_close, engine_config, prefill_last_logits, reference_greedy,
                          reference_last_logits)

NEW_TOKENS = 32


def check_parity(source, model, config, ref, prompts):
    """Batched prefill logits vs the reference; greedy alone vs ``generate``; batched vs alone."""
    batched = prefill_last_logits(model, config, prompts)
    for i, p in enumerate(prompts):
        assert_logits_close(batched[i], reference_last_logits(ref, p), config, len(p))
    with LLMEngine(engine_config(source)) as engine:
        alone = [engine.generate([p], NEW_TOKENS)[0] for p in prompts]
    for p, got in zip(prompts, alone):
        assert got == reference_greedy(ref, p, NEW_TOKENS)
    with LLMEngine(engine_config(source, block_size=8)) as engine:
        assert engine.generate(prompts, NEW_TOKENS) == alone


# --- tiny random Llama (safetensors) -------------------------------------------------------

TINY_VARIANTS = {
    "gqa2-untied": {},
    "qwen2-gqa4-tied-theta": dict(family="qwen2", num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_theta=500000.0),
}


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny(request, tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp(request.param), seed=1,
                           **TINY_VARIANTS[request.param])
    config, model = load_model(path)
    return config, model, load_reference_model(path), load_tokenizer(path), path


@pytest.mark.unit
def test_tiny_llama_parity(tiny):
    config, model, ref, tok, path = tiny
    chat = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                   add_generation_prompt=True, tokenize=False)
    prompts = [tok.encode(chat), tok.encode("The quick brown fox jumps over the lazy dog"),
               [5], list(range(40, 57))]           # 1 token, exactly 17 = 16 + 1
    check_parity(path, model, config, ref, prompts)


@pytest.mark.unit
def test_tiny_config_matches_hf(tiny):
    config, _, ref, _, _ = tiny
    hf = ref.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.hidden_size) == \
        (hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.hidden_size)
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    assert config.eos_token_ids == (hf.eos_token_id,)


@pytest.mark.unit
def test_load_weights_reports_missing_and_unexpected(tiny):
    config = tiny[0]
    fresh = LlamaForCausalLM(config)
    weights = dict(tiny[1].state_dict())
    with pytest.raises(ValueError, match="unexpected checkpoint weight 'model.foo.weight'"):
        fresh.load_weights([("model.foo.weight", torch.zeros(1))])
    hf_names = [(n, t) for n, t in load_reference_model_weights(tiny[2])
                if n != "model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="missing 1 weights.*qkv_proj"):
        fresh.load_weights(hf_names)
    assert weights                                  # the loaded model itself had everything


def load_reference_model_weights(ref):
    return list(ref.state_dict().items())


@pytest.mark.unit
def test_resolve_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match="is not 'smollm2'"):
        resolve_model(str(tmp_path / "missing-dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks"):
        resolve_model(str(tmp_path / "empty"))
    src = resolve_model("smollm2")
    assert src == resolve_model("") == resolve_model("SmolLM2-135M-Instruct")
    assert isinstance(src, ModelSource) and src.kind == "gguf" and src.path.endswith(".gguf")


# --- SmolLM2-135M-Instruct (GGUF) ----------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    source = resolve_model("smollm2")
    config, model = load_model(source)
    return config, model, load_reference_model(source), load_tokenizer(source), source


@pytest.mark.integration
def test_smollm2_config(smollm2):
    config = smollm2[0]
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert config.eos_token_ids == (2,)             # <|im_end|>


@pytest.mark.integration
def test_smollm2_parity(smollm2):
    config, model, ref, tok, source = smollm2
    questions = ["What is the capital of France?", "Write a haiku about the sea."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=False) for q in questions]
    # the first stops at <|im_end|> after 8 tokens; the others run the full 32
    prompts = [tok.encode(p) for p in prompts] + [tok.encode("Once upon a time")]
    check_parity("smollm2", model, config, ref, prompts)


@pytest.mark.unit
def test_iter_weights_reads_only_wanted_names(tmp_path):
    from engine.loader import iter_weights, load_model_config
    source = resolve_model(make_tiny_llama(tmp_path / "m", num_hidden_layers=2))
    config = load_model_config(source).replace(dtype="bfloat16")
    got = dict(iter_weights(source, config, want=lambda n: ".layers.1." in n))
    assert got and all(".layers.1." in n for n in got)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}


def test_a_cancelled_forward_pass_stops_between_layers(tiny_llama_dir):
    """A prefill whose client left stops at the next layer instead of running to the end."""
    import threading

    from engine.batch import ForwardCancelled

    config, model = load_model(tiny_llama_dir)
    prompt = list(range(3, 40))
    ran = []
    cancelled = threading.Event()
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: ran.append(i))
    leave = model.model.layers[0].register_forward_hook(lambda *a: cancelled.set())  # the client leaves now
    kv = torch.zeros(config.num_layers, 2, 3, 16, config.num_kv_heads, config.head_dim)
    batch = ForwardBatch.prefill([prompt], [[0, 1, 2]], 16)
    batch.cancelled = cancelled
    with torch.inference_mode(), pytest.raises(ForwardCancelled, match="before layer 1"):
        model(batch, kv)
    assert ran == [0] and config.num_layers > 1
    leave.remove()
    cancelled.clear()
    ran.clear()
    with torch.inference_mode():    # the same forward on the same input twice: bit for bit
        assert torch.equal(model(batch, kv), prefill_last_logits(model, config, [prompt]))
    assert ran == list(range(config.num_layers)) * 2
