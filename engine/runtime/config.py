"""What a rank needs to know to run: :class:`RuntimeConfig` (model, layout, device, KV cache,
transport) and :class:`Rendezvous` (where rank 0 is and which ranks this process runs).

Each field declares its own flag (``common.flags.option``): ``cleave worker`` and ``cleave
rank`` get theirs from ``services.config.WorkerConfig``, which holds a ``RuntimeConfig``; tests
and benches build it directly. Rank 0 publishes its ``RuntimeConfig`` in the rendezvous store;
ranks started on their own take it from there and keep only their own host-local fields
(``host``, ``device``, ``threads``), so the ranks of an instance cannot disagree on the model
or the layout. Validated on construction (``ValueError``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from common.config import host_option, model_option
from common.flags import option
from common.layout import ParallelConfig
from common.model import WEIGHTS_DTYPES
from engine.runtime.cores import format_cpus, parse_cpus
from engine.runtime.device import DEVICES, DTYPE_NAMES

TRANSPORTS = ("ucx", "tcp", "fake")


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of an instance meet, torchrun-style.

    ``master_addr:master_port`` is rank 0's store (rank 0 serves it on ``master_addr``; port 0
    = a free port, only when every rank is spawned by rank 0). This process runs the
    ``nproc_per_node`` consecutive ranks starting at ``node_rank * nproc_per_node``, or only
    ``rank`` when that is set (a rank started on its own). ``local_rank`` picks ``cuda:<n>`` for
    a single-rank process (default: its index on the node). ``timeout_s`` bounds the join."""

    master_addr: str = option("", unset=True, help="rank 0's rendezvous address (env MASTER_ADDR; default: "
                              "rank 0's --host)")
    master_port: int = option(0, unset=True, help="rank 0's rendezvous port (env MASTER_PORT; default 0 = a free "
                              "port, only when every rank runs on rank 0's host)")
    nproc_per_node: int = option(0, unset=True, help="ranks this command runs on this host (env LOCAL_WORLD_SIZE; "
                                 "default: all ranks of the instance)")
    node_rank: int = option(0, unset=True, help="this host's index: it runs ranks node_rank*nproc .. +nproc-1 "
                            "(env NODE_RANK; default 0)")
    rank: int = option(-1, unset=True, help="cleave rank: run exactly this one rank (env RANK) instead of a "
                       "node's ranks")
    local_rank: int = option(-1, unset=True, help="CUDA device index of a single --rank process (env LOCAL_RANK; "
                             "default 0)")
    timeout_s: float = option(300.0, flag="--rendezvous-timeout",
                              help="seconds rank 0 waits for every rank to join (it then names the missing ones)")

    def __post_init__(self) -> None:
        if not 0 <= self.master_port <= 65535:
            raise ValueError(f"master_port must be in 0..65535, got {self.master_port}")
        if self.nproc_per_node < 0 or self.node_rank < 0:
            raise ValueError(f"nproc_per_node and node_rank must be >= 0, got {self.nproc_per_node} "
                             f"and {self.node_rank}")
        if not 0 < self.timeout_s < float("inf"):
            raise ValueError(f"rendezvous timeout must be a finite number > 0, got {self.timeout_s}")

    @staticmethod
    def from_env(env=None, **flags) -> "Rendezvous":
        """Flags win; unset flags (None) come from ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
        ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``NODE_RANK`` (torchrun's names)."""
        env = os.environ if env is None else env
        names = {"master_addr": ("MASTER_ADDR", str), "master_port": ("MASTER_PORT", int),
                 "rank": ("RANK", int), "local_rank": ("LOCAL_RANK", int),
                 "nproc_per_node": ("LOCAL_WORLD_SIZE", int), "node_rank": ("NODE_RANK", int)}
        values = {}
        for key, (var, cast) in names.items():
            value = flags.pop(key, None)
            if value is None and env.get(var, "") != "":
                try:
                    value = cast(env[var])
                except ValueError:
                    raise ValueError(f"environment variable {var}={env[var]!r} is not a valid {key}") from None
            if value is not None:
                values[key] = value
        return Rendezvous(**values, **{k: v for k, v in flags.items() if v is not None})

    def local_ranks(self, world: int) -> list[int]:
        """The instance ranks this process runs (raises ``ValueError`` outside ``0..world-1``)."""
        if self.rank >= 0:
            ranks = [self.rank]
        else:
            per = self.nproc_per_node or world
            ranks = list(range(self.node_rank * per, (self.node_rank + 1) * per))
        if ranks[-1] >= world:
            raise ValueError(f"ranks {ranks[0]}..{ranks[-1]} do not exist in an instance of {world} "
                             f"ranks (check --node-rank/--rank and --nproc-per-node against the layout)")
        return ranks


@dataclass(frozen=True)
class RuntimeConfig:
    """One instance's ranks: model, layout, device, KV cache and KV transport."""

    model: str = model_option()
    parallel: ParallelConfig = option(default_factory=ParallelConfig, nested=True,
                                      help="{NAME} degree of the instance")
    device: str = option("auto", choices=DEVICES, help="where the model runs: auto = CUDA when present, else "
                         "CPU; rank r of a host uses cuda:<local rank>")
    dtype: str = option("auto", choices=DTYPE_NAMES, help="model and KV cache dtype: auto = bfloat16 on CUDA, "
                        "float32 on CPU (exact)")
    weights_dtype: str = option("fp32", choices=WEIGHTS_DTYPES, help="how the linear and embedding weights are "
                                "held: fp32 = in --dtype (exact, the default); bf16; int8 / int4 = weight-only "
                                "quantized (GGUF Q8_0/Q4_0/Q4_1/Q4_K codes used as they are where the kernel "
                                "takes them; CPU only). Not token-exact: see bench/quant.py for agreement and "
                                "perplexity")
    block_size: int = option(16, help="tokens per KV block")
    num_blocks: int = option(0, help="KV blocks (overrides --kv-cache-mb; 0 = derive from it)")
    kv_cache_bytes: int = option(1 << 30, flag="--kv-cache-mb", to_field=lambda mb: mb << 20,
                                 from_field=lambda b: b >> 20, help="KV cache size of the instance (MiB)")
    transport: str = option("ucx", choices=TRANSPORTS, help="KV transport")
    checksum: bool = option(True, help="CRC32 of every KV message (--no-checksum skips it)")
    host: str = host_option()          # this rank's address: gRPC, KV transport, gloo/NCCL interface
    threads: int = option(0, help="torch intra-op threads per rank (0 = one per core given, else torch's "
                          "default)")
    cpus: tuple[int, ...] = option((), to_field=parse_cpus, from_field=format_cpus,
                                   help="cores for this command's ranks, e.g. 0-3 (split evenly between them; "
                                        "each rank pins to its share and runs one torch thread per core); "
                                        "empty = not pinned")
    cuda_graphs: bool = option(True, help="replay decode steps from CUDA graphs captured per batch-size bucket "
                               "(CUDA only)")
    max_batch: int = option(64, help="decode: running sequences per step (sizes the CUDA graph buckets)")
    prefix_cache: bool = option(True, help="keep the KV of recent prompts and finished sequences and reuse "
                                "their leading blocks for prompts that start the same way (--no-prefix-cache "
                                "turns it off; always off on context-parallel instances)")
    max_preemptions: int = option(8, help="decode: times a sequence may be preempted for lack of KV blocks "
                                  "(resumed by recompute) before it fails")
    prefill_chunk_tokens: int = option(256, help="decode: prompt tokens a decode instance computes per step for "
                                       "requests it prefills itself (local prefill), in chunks run after each "
                                       "decode step so running streams keep their TPOT; a multiple of "
                                       "--block-size")
    fake_engine: bool = option(False, help="benchmark tool, not for serving: run the deterministic fake model "
                               "(engine.runtime.fake: no weights, a real KV cache and handoff, the served "
                               "model's shape and tokenizer) so a load test measures the router and workers "
                               "alone (bench/serving_path.py); one rank only")
    rendezvous: Rendezvous = option(default_factory=Rendezvous, nested=True, build=Rendezvous.from_env,
                                    help="where the instance's ranks meet")

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {self.weights_dtype!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_preemptions < 0:
            raise ValueError(f"max_preemptions must be >= 0, got {self.max_preemptions}")
        if self.prefill_chunk_tokens < 1 or (self.block_size > 0 and self.prefill_chunk_tokens % self.block_size):
            raise ValueError(f"prefill_chunk_tokens must be a positive multiple of block_size ({self.block_size}), "
                             f"got {self.prefill_chunk_tokens}")
        if self.fake_engine and self.world_size != 1:
            raise ValueError(f"--fake-engine runs one rank, got layout {self.parallel}: drop the TP/PP/CP/EP flags")
        local = len(self.rendezvous.local_ranks(self.world_size))
        per_rank = max(1, len(self.cpus) // local)        # ranks share cores when there are fewer
        if self.cpus and self.threads > per_rank:
            raise ValueError(f"{self.threads} torch threads per rank, but each of the {local} rank(s) on "
                             f"this host gets {per_rank} core(s) of the {len(self.cpus)} in --cpus: lower "
                             f"--threads (0 = one per core) or give more cores")

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    def for_rank_host(self, local: "RuntimeConfig") -> "RuntimeConfig":
        """Rank 0's config with this host's own fields (address, device, threads, cores, rendezvous)."""
        return dataclasses.replace(self, host=local.host, device=local.device, threads=local.threads,
                                   cpus=local.cpus, rendezvous=local.rendezvous)

    def mismatch(self, other: "RuntimeConfig") -> list[str]:
        """Instance-wide fields where ``other`` (a rank's own flags) differs from this (rank 0's)."""
        keys = ("model", "parallel", "dtype", "weights_dtype", "block_size", "transport", "fake_engine")
        return [f"{k}: rank 0 has {getattr(self, k)!r}, this rank {getattr(other, k)!r}"
                for k in keys if getattr(self, k) != getattr(other, k)]
