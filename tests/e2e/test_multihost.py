"""An instance whose ranks are separate ``cleave`` processes that nobody spawned: a TP2 x PP2
decode instance = ``cleave worker decode`` (rank 0, the service, ``--nproc-per-node 1``) plus
three ``cleave rank decode --rank r`` joined through ``--master-addr/--master-port``, as on
four hosts. It serves the stack token-exact against transformers; killing one rank takes the
instance down cleanly (rank 0 exits non-zero and leaves the registry; the other ranks leave)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from engine.parallel import free_port
from tests.conftest import hf_greedy
from tests.stack import process_alive

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

LAYOUT = ("--tp", "2", "--pp", "2")


@pytest.fixture(scope="module")
def tiny_reference(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def test_ranks_started_on_their_own_serve_with_parity(tiny_llama_dir, tiny_reference):
    from engine.runtime.config import Rendezvous
    from services.launcher import StackConfig, workers
    from tests.stack import RunningStack

    port = free_port()
    common = ("--model", tiny_llama_dir, "--transport", "tcp", "--num-blocks", "64", "--block-size", "8",
              "--threads", "1", "--device", "cpu")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}   # the usual variables
    ranks = [subprocess.Popen([sys.executable, "-m", "services.cli", "--log-level", "WARNING", "rank", "decode",
                               *LAYOUT, *common, "--rank", str(r), "--host", "127.0.0.1"],
                              env=env, stderr=subprocess.PIPE, text=True) for r in (1, 2, 3)]
    stack = None
    try:
        rendezvous = Rendezvous(nproc_per_node=1, master_port=port, timeout_s=120.0)
        stack = RunningStack(StackConfig(
            port=0, model=tiny_llama_dir, log_level="WARNING",
            **workers(transport="tcp", num_blocks=64, block_size=8, threads=1, device="cpu",
                      decode=dict(tp=2, pp=2, rendezvous=rendezvous))))
        assert all(p.poll() is None for p in ranks), "a rank left while its instance serves"
        for ids in ([5, 17, 33, 2, 101, 7, 9], [64, 3, 12, 250, 8, 8, 1, 30, 2, 7, 11]):
            assert stack.generate(token_ids=ids, max_tokens=12).token_ids == hf_greedy(tiny_reference, ids, 12)
        decode = next(p for name, p in stack.stack.procs if name.startswith("decode"))
        os.kill(ranks[1].pid, signal.SIGKILL)                 # rank 2 dies
        assert decode.wait(timeout=90) != 0                   # the instance goes down, reporting failure
        deadline = time.time() + 30
        while any(w.pool == "decode" for w in stack.workers()):
            assert time.time() < deadline, "the dead instance stayed in the routing set"
            time.sleep(0.2)
        for p in (ranks[0], ranks[2]):
            p.wait(timeout=60)                                # the surviving ranks leave with it
            assert not process_alive(p.pid)
    finally:
        if stack is not None:
            stack.close()
        for p in ranks:
            if p.poll() is None:
                p.kill()
