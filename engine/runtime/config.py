"""What a rank needs to know to run: :class:`RuntimeConfig` (model, layout, device, KV cache,
transport) and :class:`Rendezvous` (where rank 0 is and which ranks this process runs).

Built by the CLI (``services.cli``) from flags, by tests and benches directly. Rank 0 publishes
its ``RuntimeConfig`` in the rendezvous store; ranks started on their own take it from there and
keep only their own host-local fields (``host``, ``device``, ``threads``), so the ranks of an
instance cannot disagree on the model or the layout. Validated on construction (``ValueError``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from common.layout import ParallelConfig
from common.model import WEIGHTS_DTYPES
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

    master_addr: str = ""              # "" = this process's --host (rank 0)
    master_port: int = 0
    nproc_per_node: int = 0            # 0 = every rank of the instance on this host
    node_rank: int = 0
    rank: int = -1                     # >= 0: run exactly this rank (``cleave rank --rank``)
    local_rank: int = -1               # >= 0: the CUDA device index of a single-rank process
    timeout_s: float = 300.0

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
class ExpertStats:
    """Where a MoE decode instance's stage leaders write expert counts (``engine.expert_stats``)."""

    redis_url: str
    key_prefix: str = "cleave:"
    interval_s: int = 10
    window_s: float = 300.0


@dataclass(frozen=True)
class RuntimeConfig:
    """One instance's ranks: model, layout, device, KV cache and KV transport."""

    model: str = ""                    # "" (default SmolLM2), a .gguf file or an HF directory
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"               # auto | cuda | cpu
    dtype: str = "auto"                # auto = bfloat16 on CUDA, float32 on CPU
    weights_dtype: str = "fp32"        # how weights are held (engine.quant): fp32 (in dtype, exact) | bf16 | int8 | int4
    block_size: int = 16
    num_blocks: int = 0                # 0 = derive from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    transport: str = "ucx"
    checksum: bool = True
    host: str = "127.0.0.1"            # this rank's address: KV transport, gloo/NCCL interface
    threads: int = 0                   # torch intra-op threads per rank; 0 = one per core given, else torch's default
    cpus: tuple[int, ...] = ()         # cores of this host for its ranks (split between them); () = unpinned
    cuda_graphs: bool = True           # decode steps replayed from CUDA graphs (CUDA only)
    max_batch: int = 64                # largest decode batch (sizes the CUDA graph buckets)
    expert_stats: ExpertStats | None = None
    rendezvous: Rendezvous = field(default_factory=Rendezvous)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {self.weights_dtype!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.threads < 0 or self.max_batch < 1:
            raise ValueError(f"need threads >= 0 and max_batch >= 1, got {self.threads} and {self.max_batch}")
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
        keys = ("model", "parallel", "dtype", "weights_dtype", "block_size", "transport")
        return [f"{k}: rank 0 has {getattr(self, k)!r}, this rank {getattr(other, k)!r}"
                for k in keys if getattr(self, k) != getattr(other, k)]
