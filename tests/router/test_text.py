"""Incremental detokenization (router.text.IncrementalText) gives exactly the full decode's text,
whatever the chunking, on the default model's tokenizer (multi-byte characters, emoji, spaces,
random ids that form invalid UTF-8)."""
from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.unit

TEXTS = ["Héllo wörld — 日本語のテキスト 🚀🚀 emoji and spaces   here.\n\nNew para",
         "def f(x):\n    return x**2  # ünïcödé", " leading space and trailing  "]


@pytest.fixture(scope="module")
def codec():
    from engine.source import load_tokenizer
    from router.text import TextCodec

    return TextCodec(load_tokenizer(""))


def _stream(codec, ids, rng) -> str:
    from router.text import IncrementalText

    text, out, i = IncrementalText(codec), "", 0
    while i < len(ids):
        n = rng.randint(1, 3)
        out += text.add(ids[i:i + n], final=i + n >= len(ids))
        i += n
    return out


def test_chunked_stream_equals_full_decode(codec):
    rng = random.Random(0)
    cases = [codec.tokenizer.encode(t) for t in TEXTS]
    cases += [[rng.randrange(len(codec.tokenizer)) for _ in range(40)] for _ in range(100)]
    for ids in cases:
        for _ in range(5):
            assert _stream(codec, ids, rng) == codec.decode(ids)
