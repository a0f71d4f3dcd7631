"""The engine runtime (``engine.runtime``): devices, rendezvous flags, executors' typed calls,
errors carried from any rank with their type, and a rank that never joins."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from common.layout import ParallelConfig
from engine.parallel import free_port
from engine.runtime.config import Rendezvous, RuntimeConfig
from engine.runtime.device import DeviceUnavailable, resolve_device, resolve_dtype
from tests.tolerances import assert_close, model_reduction_length


# ---- devices ---------------------------------------------------------------------------------
@pytest.mark.unit
def test_auto_picks_cpu_here_and_cuda_fails_clearly():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_dtype("float16", torch.device("cpu")) == "float16"
    with pytest.raises(DeviceUnavailable, match="no CUDA device.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")


@pytest.mark.unit
@pytest.mark.parametrize("command", ["worker", "rank"])
def test_cli_device_cuda_without_cuda_exits_2_before_loading(command):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    extra = ["--master-addr", "127.0.0.1", "--master-port", "1", "--rank", "1"] if command == "rank" else []
    proc = subprocess.run([sys.executable, "-m", "services.cli", command, "decode", "--device", "cuda", *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr


# ---- rendezvous flags --------------------------------------------------------------------------
@pytest.mark.unit
def test_rendezvous_from_flags_and_environment():
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "RANK": "3", "LOCAL_RANK": "1"}
    r = Rendezvous.from_env(env, master_port=None, rank=None, timeout_s=5.0)
    assert (r.master_addr, r.master_port, r.rank, r.local_rank, r.timeout_s) == ("10.0.0.1", 29500, 3, 1, 5.0)
    assert r.local_ranks(4) == [3]
    r = Rendezvous.from_env(env, master_addr="10.9.9.9", rank=-1, nproc_per_node=2, node_rank=1)
    assert r.master_addr == "10.9.9.9" and r.local_ranks(4) == [2, 3]   # flags win
    assert Rendezvous().local_ranks(4) == [0, 1, 2, 3]                  # default: every rank here
    with pytest.raises(ValueError, match="do not exist in an instance of 4"):
        Rendezvous(nproc_per_node=2, node_rank=2).local_ranks(4)
    with pytest.raises(ValueError, match="MASTER_PORT='x'"):
        Rendezvous.from_env({"MASTER_PORT": "x"})
    with pytest.raises(ValueError, match="timeout"):
        Rendezvous(timeout_s=float("nan"))


# ---- executors --------------------------------------------------------------------------------
def _raise_on_rank_one(runner):
    if runner.groups.rank == 1:
        raise KeyError("missing on rank one")
    return runner.groups.rank


def _shard_info(runner):
    return {"rank": runner.groups.rank, "layers": list(runner.layers), "heads": list(runner.heads),
            "kv": tuple(runner.kv_cache.shape)}


def logits_k(model_dir: str, context: int) -> int:
    """The reduction length bounding a model's logits: layouts other than one rank sum in
    another order, so they agree within ``tests.tolerances``, not bit for bit."""
    from engine.loader import load_model_config, resolve_model
    return model_reduction_length(load_model_config(resolve_model(model_dir)), context)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_local_executor_typed_calls_match_in_process(tiny_llama_dir):
    """TP2 x PP2 on four local ranks: each rank holds its shard; forward equals one rank's
    logits; an error on rank 1 comes back as a KeyError naming rank 1."""
    from engine.batch import ForwardBatch
    from engine.runtime.executor import InProcessExecutor, LocalExecutor

    base = RuntimeConfig(model=tiny_llama_dir, device="cpu", transport="tcp", num_blocks=16, block_size=8,
                         threads=1)
    prompt = [5, 17, 33, 2, 101, 7, 9, 64, 3, 12]
    batch = ForwardBatch.prefill([prompt], [[0, 1]], 8)
    with InProcessExecutor(base) as one:
        want = one.forward(batch)
    cfg = RuntimeConfig(**{**base.__dict__, "parallel": ParallelConfig(tp=2, pp=2)})
    with LocalExecutor(cfg) as ex:
        got = ex.forward(ForwardBatch.prefill([prompt], [[0, 1]], 8))
        k = logits_k(tiny_llama_dir, len(prompt))
        assert_close(got, want, k=k)
        infos = ex.run_on_ranks(_shard_info)
        assert [i["rank"] for i in infos] == [0, 1, 2, 3]
        assert infos[0]["layers"] != infos[2]["layers"] and infos[0]["heads"] != infos[1]["heads"]
        with pytest.raises(KeyError) as err:
            ex.run_on_ranks(_raise_on_rank_one)
        assert err.value.rank == 1 and any("rank 1" in n for n in err.value.__notes__)
        assert len(ex.landing_ranks()) == 4
        again = ex.forward(ForwardBatch.prefill([prompt], [[0, 1]], 8))   # still serving after the error
        assert_close(again, want, k=k)


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_rank_that_never_joins_is_named_within_the_timeout(tiny_llama_dir):
    """Rank 0 of a two-rank instance whose rank 1 is external and never started: it fails
    within its rendezvous timeout and names rank 1."""
    from engine.runtime.executor import ExternalExecutor, make_executor
    from engine.runtime.rendezvous import RendezvousTimeout

    cfg = RuntimeConfig(model=tiny_llama_dir, device="cpu", transport="tcp", num_blocks=8, block_size=8,
                        parallel=ParallelConfig(tp=2),
                        rendezvous=Rendezvous(master_port=free_port(), nproc_per_node=1, timeout_s=3.0))
    t0 = time.monotonic()
    with pytest.raises(RendezvousTimeout, match=r"rank\(s\) \[1\] of 2 never joined"):
        assert isinstance(make_executor(cfg), ExternalExecutor)
    assert time.monotonic() - t0 < 30


@pytest.mark.unit
def test_the_cli_says_a_rendezvous_timeout_in_one_line_and_raises_other_errors(monkeypatch, capsys):
    import services.cli as cli
    from engine.runtime.rendezvous import RendezvousTimeout

    def fail(error):
        def run(args):
            raise error
        return run
    monkeypatch.setattr(cli, "_run_rank", fail(RendezvousTimeout("rank(s) [1] of 2 never joined")))
    assert cli.main(["rank", "decode"]) == 1
    assert "cleave rank: rank(s) [1] of 2 never joined" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_run_rank", fail(RuntimeError("RendezvousTimeout by name only")))
    with pytest.raises(RuntimeError, match="by name only"):
        cli.main(["rank", "decode"])


@pytest.mark.unit
def test_external_ranks_need_a_fixed_port(tiny_llama_dir):
    from engine.runtime.executor import make_executor

    cfg = RuntimeConfig(model=tiny_llama_dir, device="cpu", parallel=ParallelConfig(tp=2),
                        rendezvous=Rendezvous(nproc_per_node=1))
    with pytest.raises(ValueError, match="--master-port"):
        make_executor(cfg)


def _probe_on(runner):
    import torch.distributed.distributed_c10d as c10d

    from engine.runtime.rank import OverlapProbe
    runner.probe = OverlapProbe(c10d._get_default_store(), runner.groups.pp_rank)
    runner.micro_batches = 0


def _probe_counts(runner):
    return {"stage": runner.groups.pp_rank, "overlaps": runner.probe.overlaps, "micro": runner.micro_batches}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_pipeline_decode_runs_micro_batches_that_overlap(tiny_llama_dir):
    """PP2 serving: a decode batch runs as micro-batches with the same logits as one rank, and
    stage 1 computes micro-batch i while stage 0 already computes i + 1 (counted, not timed)."""
    from engine.batch import ForwardBatch
    from engine.runtime.executor import InProcessExecutor, LocalExecutor

    base = RuntimeConfig(model=tiny_llama_dir, device="cpu", transport="tcp", num_blocks=32, block_size=8,
                         threads=1)
    prompts = [[5, 17, 33, 2, 101, 7], [9, 64, 3], [12, 250, 8, 8, 1], [30, 2, 7, 11, 4, 4, 4, 9, 1]]
    tables = [[4 * i, 4 * i + 1] for i in range(len(prompts))]

    def run(ex, steps=4):
        """Prefill, then ``steps`` greedy decode steps: the last step's logits, and the same
        step again reduced on the ranks (``full_rows``: StepLogits; it rewrites the same KV)."""
        toks = ex.forward(ForwardBatch.prefill(prompts, tables, 8)).argmax(-1).tolist()
        pos = [len(p) for p in prompts]
        for k in range(steps):
            last = (toks, [p + k for p in pos], tables, 8)
            logits = ex.forward(ForwardBatch.decode(*last))
            toks = logits.argmax(-1).tolist()
        again = ForwardBatch.decode(*last)
        again.full_rows = (1, 3)
        return logits, ex.forward(again)

    with InProcessExecutor(base) as one:
        want, want_reduced = run(one)
    with LocalExecutor(RuntimeConfig(**{**base.__dict__, "parallel": ParallelConfig(pp=2)})) as ex:
        ex.run_on_ranks(_probe_on)
        got, reduced = run(ex)
        counts = ex.run_on_ranks(_probe_counts)
    k = logits_k(tiny_llama_dir, max(map(len, prompts)) + 4)
    for g, w in zip(got, want):
        assert_close(g, w, k=k)
    for step, full in ((want_reduced, want), (reduced, got)):   # reduced where made, the same numbers
        assert step.rows == [1, 3] and torch.equal(step.argmax, full.argmax(-1))
        assert_close(step.best, full.max(-1).values, k=k)
        assert_close(step.logits, full[[1, 3]], k=k)
    assert [c["micro"] for c in counts] == [10, 10]          # each of 5 decode steps ran as 2 micro-batches
    # stage 1 computed a micro-batch while stage 0 already computed the next one: by construction
    # (non-blocking sends) in every step; asked of at least one step, as a loaded machine can
    # deschedule stage 0 between its send and its next micro-batch
    assert counts[1]["overlaps"] >= 1
