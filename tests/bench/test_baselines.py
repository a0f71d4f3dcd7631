"""``bench/baselines.py``: reading ``llama-batched-bench`` results into the serving bench's rows,
and the weight-bytes count of the decode floor. No timing is asserted (figures live in the bench)."""
from __future__ import annotations

import pytest
import torch

from bench.baselines import llama_cpp_row, parse_batched_bench, weight_bytes

pytestmark = pytest.mark.unit

# as llama-batched-bench --output-format jsonl prints them (tools/batched-bench/batched-bench.cpp),
# between its log lines
OUTPUT = """main: n_kv_max = 4096, n_batch = 2048, n_ubatch = 512, flash_attn = -1
{"n_kv_max": 4096, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 64, "tg": 64, "pl": 1, "n_kv": 128, "t_pp": 0.100000, "speed_pp": 640.0, "t_tg": 0.960000, "speed_tg": 66.66, "t": 1.060000, "speed": 120.75}
{"n_kv_max": 4096, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 64, "tg": 64, "pl": 16, "n_kv": 2048, "t_pp": 1.600000, "speed_pp": 640.0, "t_tg": 13.400000, "speed_tg": 76.41, "t": 15.000000, "speed": 136.53}

llama_perf_context_print: load time = 50.00 ms
"""


def test_batched_bench_lines_become_rows():
    rows = {r["pl"]: llama_cpp_row(r) for r in parse_batched_bench(OUTPUT)}
    assert sorted(rows) == [1, 16]
    one, sixteen = rows[1], rows[16]
    assert one["ttft_p50"] == pytest.approx(0.1)          # prefill of the batch
    assert one["tpot"] == pytest.approx(0.96 / 64)        # decode time per token
    assert one["tput"] == pytest.approx(64 / 1.06)        # completion tokens over prefill + decode
    assert sixteen["tput"] == pytest.approx(16 * 64 / 15.0)
    assert sixteen["tpot"] == pytest.approx(13.4 / 64)


def test_markdown_output_is_not_mistaken_for_results():
    assert parse_batched_bench("|    PP |     TG |    B |\n|    64 |     64 |    1 |") == []


def test_weight_bytes_counts_tied_tensors_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight                              # tied, as SmolLM2's lm_head
    model = torch.nn.ModuleDict({"emb": emb, "head": head, "norm": torch.nn.LayerNorm(4)})
    model.register_buffer("scale", torch.ones(3, dtype=torch.int8))
    assert weight_bytes(model) == 10 * 4 * 4 + 2 * 4 * 4 + 3
