"""What ``bench/serving.py`` compares Cleave against, measured in the bench's own process.

Caller: ``bench/serving.py`` (``make bench``), after the stack has stopped, so nothing here
competes with the workers for the cores. Every function returns figures; none prints.

* :func:`bench_hf`: transformers' greedy ``generate`` at batch B (TTFT = a 1-token generate
  of the batch, TPOT = the rest of a B x ``tokens`` generate per token, throughput =
  completion tokens / wall of that generate).
* :func:`llama_cpp_bin` / :func:`bench_llama_cpp`: ``llama-batched-bench`` on the same GGUF
  file, built by ``../shared/tools/build-llama-cpp.sh`` (never built from here: the bin folder
  is used only when the script's cached build is already there).
* :func:`memory_bandwidth`, :func:`weight_bytes`, :func:`engine_decode_step`: the batch-1
  decode step of the engine alone against the weight-bytes / bandwidth floor.

A row is a dict ``ttft_p50``, ``ttft_p90``, ``tpot`` (seconds) and ``tput`` (completion tok/s).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import torch

# /work/main/bench -> /work/shared/tools (the repo's ../shared, as the issue names it)
BUILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tools",
                            "build-llama-cpp.sh")
LLAMA_CPP_VERSION = "11434.0.0"        # the script's default LLAMA_CPP_BIN_VERSION

PROMPTS = ["Explain how a refrigerator works.", "Write a short story about a lighthouse keeper.",
           "List some uses of graph theory.", "Describe the water cycle to a child.",
           "What makes a good API design?", "Summarize the history of the printing press.",
           "How do vaccines train the immune system?", "Give advice to a new programmer."]


def prompt_ids(tokenizer, i: int, n: int) -> list[int]:
    """Exactly ``n`` token ids of English text (prompt ``i`` padded with a repeated sentence)."""
    ids = tokenizer.encode(PROMPTS[i % len(PROMPTS)] + " " + "Please be detailed. " * (n // 2 + 8))
    return ids[:n]


def bench_hf(model, tokenizer, batch: int, tokens: int, prompt_tokens: int) -> dict:
    """One row for transformers ``generate`` (greedy, exactly ``tokens`` new tokens) at ``batch``."""
    ids = torch.tensor([prompt_ids(tokenizer, i, prompt_tokens) for i in range(batch)])
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        wall = time.perf_counter() - t0
    n = (out.shape[1] - ids.shape[1]) * batch
    return dict(ttft_p50=ttft, ttft_p90=ttft, tpot=(wall - ttft) / max(1, tokens - 1), tput=n / wall)


def llama_cpp_bin() -> tuple[str | None, str]:
    """``(bin folder, "")`` when ``llama-batched-bench`` is built, else ``(None, why not)``.

    Runs the build script only when its cache already holds the binary (it then prints the
    folder at once); a missing build is reported, never started (it takes 10-20 minutes)."""
    cache = os.environ.get("CLEAVE_LLAMA_CPP_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cleave-llama-cpp")
    version = os.environ.get("LLAMA_CPP_BIN_VERSION", LLAMA_CPP_VERSION)
    folder = os.path.join(cache, f"llama_cpp_bin-{version}", "llama.cpp", "build", "bin")
    if not os.access(os.path.join(folder, "llama-batched-bench"), os.X_OK):
        return None, (f"llama.cpp rows left out: no {folder}/llama-batched-bench; "
                      f"build it with {os.path.normpath(BUILD_SCRIPT)} (10-20 minutes)")
    if os.path.isfile(BUILD_SCRIPT):
        done = subprocess.run(["bash", BUILD_SCRIPT], capture_output=True, text=True, timeout=60)
        if done.returncode == 0 and done.stdout.strip():
            folder = done.stdout.strip().splitlines()[-1]
    return folder, ""


def parse_batched_bench(text: str) -> list[dict]:
    """The result lines of ``llama-batched-bench --output-format jsonl`` (one JSON object per
    (pp, tg, pl): ``pl`` sequences, ``t_pp`` / ``t_tg`` / ``t`` seconds); other lines are skipped."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            rows.append(json.loads(line))
    return rows


def llama_cpp_row(r: dict) -> dict:
    """A bench row from one batched-bench result: TTFT ~ ``t_pp`` (prefill of the whole batch,
    every sequence its own prompt), TPOT ~ ``t_tg / tg``, throughput = completion tokens
    (``pl * tg``) / ``t`` (prefill included)."""
    return dict(ttft_p50=r["t_pp"], ttft_p90=r["t_pp"], tpot=r["t_tg"] / r["tg"], tput=r["pl"] * r["tg"] / r["t"])


def bench_llama_cpp(folder: str, gguf: str, threads: int, levels: list[int], prompt_tokens: int,
                    tokens: int) -> tuple[dict[int, dict], str]:
    """``(rows by number of sequences, note)`` from one ``llama-batched-bench`` run on ``gguf``
    with ``threads`` threads (each sequence its own prompt). When the run dies of SIGILL (a
    ``GGML_NATIVE`` build uses AMX tile kernels for repacked weights, and a VM whose kernel has
    not enabled AMX state faults on them) it reruns with ``--no-repack`` and says so in ``note``.
    Raises RuntimeError (with the tool's output tail) when it fails otherwise."""
    ctx = max(4096, max(levels) * (prompt_tokens + tokens))
    argv = [os.path.join(folder, "llama-batched-bench"), "-m", gguf, "-c", str(ctx), "-npp", str(prompt_tokens),
            "-ntg", str(tokens), "-npl", ",".join(map(str, levels)), "-t", str(threads), "--output-format", "jsonl"]
    note = ""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode == -signal.SIGILL:
        argv.append("--no-repack")
        note = "llama.cpp's repacked (AMX) kernels hit SIGILL on this CPU: its rows ran with --no-repack"
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    rows = parse_batched_bench(done.stdout + "\n" + done.stderr)
    if done.returncode != 0 or not rows:
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode} with no result line:\n{tail}")
    return {r["pl"]: llama_cpp_row(r) for r in rows}, note


def memory_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a ``mib``-MiB fp32 tensor copy with ``threads`` torch threads, best of ``repeats``,
    counting the read and the write (2 x the tensor). The floor a decode step that streams every
    weight once can reach with these threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(mib << 18)                  # mib MiB of float32
        dst = torch.empty_like(src)
        dst.copy_(src)                               # fault the pages in
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        return 2 * src.numel() * src.element_size() / best
    finally:
        torch.set_num_threads(before)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as held (tied tensors counted once)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def engine_decode_step(model: str, weights_dtype: str, prompt: list[int], tokens: int) -> float:
    """Seconds per batch-1 decode step of the engine alone (``engine.llm_engine.LLMEngine`` on the
    CPU: the serving executor and decode scheduler in this process, no services) for ``model``
    (a ``--model`` value) held as ``weights_dtype``: (time of ``tokens`` new tokens - time of 1)
    / (``tokens`` - 1), after a warm-up."""
    from engine.llm_engine import LLMEngine
    from engine.runtime.config import RuntimeConfig
    cfg = RuntimeConfig(model=model, device="cpu", weights_dtype=weights_dtype, transport="tcp",
                        num_blocks=8 + (len(prompt) + tokens) // 16)
    with LLMEngine(cfg) as engine:
        engine.generate([prompt], 4, ignore_eos=True)
        t0 = time.perf_counter()
        engine.generate([prompt], 1, ignore_eos=True)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.generate([prompt], tokens, ignore_eos=True)
        return (time.perf_counter() - t0 - one) / max(1, tokens - 1)
