"""Weights onto a device: the engine's model or one rank's shard, and the ``transformers`` reference.

Callers: services and the in-process engine call :func:`resolve_model` on the ``--model`` flag, then
:func:`load_model` (config + loaded model or one rank's shard, on a device) and :func:`load_tokenizer`;
tests and the bench also call :func:`load_reference_model` (Hugging Face ``transformers`` on
the same weights, the correctness oracle). Format details live in ``engine.gguf_loader`` and
``engine.hf_loader``.

Spec forms, the source, its shape and its tokenizer come from ``engine.source`` (no torch: the
router uses it alone); :func:`resolve_model`, :func:`load_model_config` and :func:`load_tokenizer`
are imported here for callers that also load weights.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from common.model import ModelConfig
from engine import gguf_loader, hf_loader
from engine.source import DEFAULT_MODEL_ID, ModelSource, load_model_config, load_tokenizer, resolve_model  # noqa: F401
from engine.source import as_source as _as_source, hf_args as _hf_args


def iter_weights(source: ModelSource, config: ModelConfig, want: Callable[[str], bool] | None = None,
                 reader=None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs in ``config.dtype``, read lazily; ``want`` filters by name."""
    if source.kind == "gguf":
        return gguf_loader.iter_reader_weights(reader or gguf_loader.open_reader(source.path), config, want)
    return hf_loader.iter_dir_weights(source.path, config, want)


def load_model(spec_or_source: str | ModelSource, dtype: str = "float32", device: str | torch.device = "cpu",
               groups=None, weights_dtype: str = "fp32"):
    """``(ModelConfig, model)`` in eval mode on ``device``: the whole model (``groups=None``) or
    one rank's shard (``groups``: its :class:`~engine.parallel.ParallelGroups`), dense Llama or
    Mixtral (``engine.moe.build_model``). Only the rank's tensors are read, one at a time, and
    each is copied straight into its (sliced) parameter on ``device``. The one loader: tests,
    benches and every serving rank (``engine.runtime.rank``, also under ``engine.llm_engine``) call it.
    ``weights_dtype`` (``--weights-dtype``): how the linear and embedding weights are held,
    ``engine.quant`` (fp32 = in ``dtype``, the exact path; bf16; int8 and int4, CPU only).

    Raises ``ValueError`` (quoting the values) when the layout cannot split the model (or its
    quantized weights), the checkpoint does not match it or int8/int4 is asked off the CPU;
    ``FileNotFoundError`` for missing files."""
    from engine.moe import build_model
    if weights_dtype in ("int8", "int4") and torch.device(device).type != "cpu":
        raise ValueError(f"--weights-dtype {weights_dtype} runs torch's CPU {weights_dtype} kernels (not "
                         f"validated on {device}); use bf16 or fp32 there")
    source = _as_source(spec_or_source)
    reader = gguf_loader.open_reader(source.path) if source.kind == "gguf" else None
    config = load_model_config(source, reader).replace(dtype=dtype, weights_dtype=weights_dtype)
    with torch.device(device):                       # parameters and buffers are made there
        model = build_model(config, groups)
    model.load_weights(iter_weights(source, config, want=model.wants, reader=reader))
    return config, model.eval()


def load_reference_model(spec_or_source: str | ModelSource):
    """``transformers`` AutoModelForCausalLM in fp32 on the same weights, eval mode (the oracle)."""
    from transformers import AutoModelForCausalLM
    path, kwargs = _hf_args(_as_source(spec_or_source))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
