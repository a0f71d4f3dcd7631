"""Hardware profiles: datasheet figures of data-centre GPUs and their node topology, and the
calibrated ``local`` one.

A :class:`Hardware` answers three questions for the cost model (``services.capacity.cost``):
how fast one device multiplies (:meth:`Hardware.flops_for`, FLOP/s), how fast it streams memory
(``mem_bw``, bytes/s), and how long a collective over ``n`` devices takes
(:meth:`Hardware.collective`, seconds and the algorithm NCCL/RCCL would pick,
``services.capacity.collectives``).

Topology. Each GPU has ``links_per_gpu`` intra-node links of ``link_bw`` bytes/s per direction
and one NIC of ``nic_bw``. ``topology="switch"`` (NVSwitch): every link goes to the switch, so a
GPU reaches any peer, or all of them, at ``links_per_gpu x link_bw``. ``topology="mesh"``
(AMD Infinity Fabric, all-to-all): the links join GPUs pairwise, ``links_per_gpu / (gpus_per_node
- 1)`` to each peer; a pair talks over its own links only, a group of ``n`` over its ``n - 1``
links to the group (:meth:`Hardware.fabric`). A group larger than a node goes through the NICs.
The calibrated ``local`` profile instead interpolates the times it measured over the real gloo
backend (``services.capacity.calibrate``); its ``link_bw``/``link_latency_s`` are the alpha-beta
fit of those times.

Datasheet figures are dense (no sparsity) peak numbers; the ``*_eff`` factors are the share of
peak a well-tuned kernel reaches, assumptions stated once here: 0.7 of peak FLOP/s for large
GEMMs, 0.8 of HBM bandwidth, 0.8 of link and NIC bandwidth (typical NCCL bus bandwidth).
"""
from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field, replace

from services.capacity import collectives
from services.capacity.collectives import Fabric

GB = 1e9
TB = 1e12
COMM_OPS = collectives.OPS
DEFAULT_PROFILE = os.path.join("~", ".cache", "cleave", "hardware-local.json")


@dataclass(frozen=True)
class Hardware:
    """One device type and how devices are connected. Units: bytes, bytes/s, FLOP/s, seconds.

    ``flops`` maps a compute dtype (``"bf16"``, ``"fp8"``, ``"int8"``, ``"fp32"``) to dense peak
    FLOP/s of one device. ``link_bw``: one intra-node link's bandwidth per direction;
    ``links_per_gpu`` such links per device, to the switch (``topology="switch"``) or, in a full
    mesh (``topology="mesh"``), spread evenly over the ``gpus_per_node - 1`` peers (at least one
    each). ``link_latency_s``: seconds per collective step inside a node. ``nic_bw``,
    ``nic_latency_s``: each device's own scale-out NIC, per direction. ``measured``: for
    calibrated profiles, ``{op: {ranks: [[bytes, seconds], ...]}}`` replacing the alpha-beta
    formulas. ``layer_overhead_s``: fixed time per decoder layer per forward (kernel launches,
    framework dispatch); ``seq_overhead_s``: extra per sequence per layer in decode (per-sequence
    attention calls); ``step_overhead_s``: per forward of a stage; ``expert_overhead_s``: per
    expert a rank runs per layer; ``score_s``/``ring_score_s``: per attention score element
    beyond its FLOPs (softmax, masking: 0 for fused flash kernels on GPUs; the ring kernel of a
    profile with ``ring_score_s > 0`` scores every key of the prompt, masked). ``act_bytes``: bytes per activation element.
    """

    name: str
    memory_bytes: float
    flops: dict
    mem_bw: float
    link_bw: float
    link_latency_s: float
    nic_bw: float
    nic_latency_s: float
    gpus_per_node: int
    topology: str = "switch"          # "switch" (NVSwitch) or "mesh" (links joining GPUs pairwise)
    links_per_gpu: int = 1            # intra-node links of link_bw per device
    flops_eff: float = 0.7
    mem_eff: float = 0.8
    link_eff: float = 0.8
    layer_overhead_s: float = 20e-6
    seq_overhead_s: float = 0.0
    step_overhead_s: float = 0.0      # per forward of one stage (embedding, LM head call, framework)
    act_bytes: int = 2
    cores: int = 0                    # calibrated CPU profiles: ranks beyond this share cores
    mem_bw_all: float = 0.0           # calibrated CPU profiles: bandwidth of all cores together
    expert_overhead_s: float = 0.0    # per expert run per MoE layer (a loop over experts)
    score_s: float = 0.0              # per causal attention score element, beyond its FLOPs
    ring_score_s: float = 0.0         # per score element of the CP ring kernel (full masked blocks)
    pp_message_s: float = 0.0         # per PP message through the engine's runner (0: send/recv alone)
    measured: dict = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "mem_bw", "link_bw", "nic_bw", "gpus_per_node"):
            if getattr(self, name) <= 0:
                raise ValueError(f"hardware {self.name!r}: {name} must be positive, got {getattr(self, name)}")
        if not self.flops or min(self.flops.values()) <= 0:
            raise ValueError(f"hardware {self.name!r}: flops must map dtypes to positive FLOP/s, got {self.flops}")
        if self.topology not in ("switch", "mesh"):
            raise ValueError(f"hardware {self.name!r}: topology must be 'switch' or 'mesh', got {self.topology!r}")
        if self.links_per_gpu < 1:
            raise ValueError(f"hardware {self.name!r}: links_per_gpu must be >= 1, got {self.links_per_gpu}")
        if self.topology == "mesh" and self.links_per_gpu < self.gpus_per_node - 1:
            raise ValueError(f"hardware {self.name!r}: a full mesh of gpus_per_node={self.gpus_per_node} needs a link "
                             f"to each of {self.gpus_per_node - 1} peers, got links_per_gpu={self.links_per_gpu}")
        for name in ("link_latency_s", "nic_latency_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"hardware {self.name!r}: {name} must be >= 0 seconds, got {getattr(self, name)}")
        for name in ("flops_eff", "mem_eff", "link_eff"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"hardware {self.name!r}: {name} must be in (0, 1], got {getattr(self, name)}")

    def flops_for(self, dtype: str) -> float:
        """Achievable FLOP/s for matmuls whose weights are ``dtype``.

        fp8/int8 weights use the fp8/int8 tensor-core rate where the device has one (W8A8);
        int4 (and fp8/int8 without native support) dequantise to bf16 (W4A16), so bf16's rate;
        a profile with a single entry (the calibrated CPU: fp32) uses it for everything.
        """
        rate = self.flops.get(dtype) if dtype in ("fp8", "int8") else None
        rate = rate or self.flops.get("bf16") or next(iter(self.flops.values()))
        return rate * self.flops_eff

    def mem_rate(self) -> float:
        return self.mem_bw * self.mem_eff

    def oversubscription(self, ranks: int) -> float:
        """How many ranks share one core (calibrated CPU profiles); 1 for devices."""
        return max(1.0, ranks / self.cores) if self.cores else 1.0

    def bandwidth_share(self, ranks: int) -> float:
        """Share of ``mem_bw`` one rank gets while ``ranks`` run (cores share one memory bus); 1
        for devices, which each have their own memory."""
        if not (self.cores and self.mem_bw_all):
            return 1.0
        return min(1.0, self.mem_bw_all / (self.mem_bw * min(ranks, self.cores)))

    @property
    def gpu_link_bw(self) -> float:
        """All of one device's intra-node links together, bytes/s per direction (nominal)."""
        return self.link_bw * self.links_per_gpu

    def fabric(self, ranks: int, crosses_node: bool = False) -> Fabric:
        """What a group of ``ranks`` devices sees of the interconnect, after ``link_eff`` (module doc)."""
        if crosses_node:
            nic = self.nic_bw * self.link_eff
            return Fabric(nic, nic, nic, self.nic_latency_s, load_store=False, crosses_node=True)
        if self.topology == "switch":
            bw = self.gpu_link_bw * self.link_eff
            return Fabric(bw, bw, bw, self.link_latency_s)
        peer = self.link_bw * self.link_eff * max(1, self.links_per_gpu // max(1, self.gpus_per_node - 1))
        group = peer * max(1, ranks - 1)
        return Fabric(ring_bw=group, peer_bw=peer, fanout_bw=group, alpha_s=self.link_latency_s)

    def collective(self, op: str, nbytes: float, ranks: int, crosses_node: bool = False) -> tuple[float, str]:
        """``(seconds, algorithm)`` of ``op`` ("all_reduce", "all_to_all", "send_recv") of ``nbytes``
        per rank over ``ranks`` devices (a send/recv: ``ranks`` is 2), the algorithm NCCL/RCCL
        would pick (``collectives.best``), or ``"measured"`` on a calibrated profile.
        ``(0, "")`` for a single rank or no bytes."""
        if op not in COMM_OPS:
            raise ValueError(f"op must be one of {COMM_OPS}, got {op!r}")
        if ranks <= 1 or nbytes <= 0:
            return 0.0, ""
        if self.measured.get(op):
            return _interpolate(self.measured[op], ranks, nbytes), "measured"
        return collectives.best(op, nbytes, ranks, self.fabric(ranks, crosses_node))

    def comm_time(self, op: str, nbytes: float, ranks: int, crosses_node: bool = False) -> float:
        """Seconds of :meth:`collective`."""
        return self.collective(op, nbytes, ranks, crosses_node)[0]

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @staticmethod
    def from_json(data: dict) -> "Hardware":
        measured = {op: {int(r): pts for r, pts in by_ranks.items()} for op, by_ranks in data.get("measured", {}).items()}
        return Hardware(**{**data, "measured": measured})


def _interpolate(table: dict, ranks: int, nbytes: float) -> float:
    """Piecewise-linear time at ``nbytes`` from measured ``[[bytes, seconds], ...]``; rank counts
    beyond those measured scale the nearest one by the ring factor ``(n-1)/n``."""
    known = sorted(table)
    near = min(known, key=lambda r: (abs(r - ranks), -r))
    pts = sorted(table[near])
    xs = [p[0] for p in pts]
    i = min(max(bisect.bisect_left(xs, nbytes), 1), len(pts) - 1)
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    t = y0 + (y1 - y0) * (nbytes - x0) / (x1 - x0) if x1 != x0 else y0
    t = max(t, min(y for _, y in pts))
    if near != ranks:
        t *= ((ranks - 1) / ranks) / ((near - 1) / near)
    return t


def _gpu(name, memory, bf16, fp8, int8, hbm, link, links, nic, source, topology="switch", per_node=8):
    flops = {"bf16": bf16 * TB}
    if fp8:
        flops["fp8"] = fp8 * TB
    if int8:
        flops["int8"] = int8 * TB
    return Hardware(name=name, memory_bytes=memory * GB, flops=flops, mem_bw=hbm * TB, link_bw=link * GB,
                    links_per_gpu=links, link_latency_s=2e-6, nic_bw=nic * GB, nic_latency_s=5e-6, gpus_per_node=per_node,
                    topology=topology, source=source)


# Dense peak figures (sparsity halved away). Links, per link and direction (half the
# bidirectional figure): NVLink 4 (H100/H200) 18 x 25 GB/s, NVLink 5 (B200) 18 x 50 GB/s,
# NVLink 3 (A100) 12 x 25 GB/s, all to NVSwitches; Infinity Fabric: 7 links, one to each peer of
# an 8-GPU node. NIC: one 400 Gb/s (A100: 200 Gb/s) port per GPU as in the DGX / OEM 8-GPU
# platforms (50 GB/s, 25 GB/s).
BUILTIN: dict[str, Hardware] = {h.name: h for h in (
    _gpu("h100", 80, 989, 1979, 1979, 3.35, 25, 18, 50,
         "NVIDIA H100 SXM datasheet (nvidia.com/en-us/data-center/h100): 80 GB HBM3, 3.35 TB/s, "
         "BF16 1979 / FP8 3958 TFLOPS with sparsity, NVLink 900 GB/s (18 links); DGX H100: 8 GPUs, 8x ConnectX-7 400 Gb/s"),
    _gpu("h200", 141, 989, 1979, 1979, 4.8, 25, 18, 50,
         "NVIDIA H200 SXM datasheet (nvidia.com/en-us/data-center/h200): 141 GB HBM3e, 4.8 TB/s, "
         "compute as H100 SXM, NVLink 900 GB/s (18 links); HGX H200: 8 GPUs"),
    _gpu("b200", 180, 2250, 4500, 4500, 7.7, 50, 18, 50,
         "NVIDIA HGX B200 datasheet (nvidia.com/en-us/data-center/hgx): 8 GPUs, 1.44 TB HBM3e, 62 TB/s, "
         "BF16 36 / FP8 72 PFLOPS with sparsity per 8 GPUs, NVLink 5 1.8 TB/s per GPU (18 links); DGX B200: 8x 400 Gb/s"),
    _gpu("a100", 80, 312, 0, 624, 2.039, 25, 12, 25,
         "NVIDIA A100 80GB SXM datasheet (nvidia.com/en-us/data-center/a100): 80 GB HBM2e, 2039 GB/s, "
         "BF16 312 TFLOPS, INT8 624 TOPS, no FP8, NVLink 600 GB/s (12 links); DGX A100: 8x HDR 200 Gb/s"),
    _gpu("mi300x", 192, 1307.4, 2614.9, 2614.9, 5.3, 64, 7, 50,
         "AMD Instinct MI300X datasheet (amd.com): 192 GB HBM3, 5.3 TB/s, BF16 1307.4 / FP8 2614.9 TFLOPS "
         "dense, 7 Infinity Fabric links of 128 GB/s (bidirectional) in a full mesh of 8 GPUs", "mesh"),
    _gpu("mi325x", 256, 1307.4, 2614.9, 2614.9, 6.0, 64, 7, 50,
         "AMD Instinct MI325X datasheet (amd.com): 256 GB HBM3E, 6 TB/s, BF16 1307.4 / FP8 2614.9 TFLOPS "
         "dense, Infinity Fabric as MI300X", "mesh"),
    _gpu("mi355x", 288, 2500, 5000, 5000, 8.0, 76.8, 7, 50,
         "AMD Instinct MI355X datasheet (amd.com): 288 GB HBM3E, 8 TB/s, FP16 2.5 / FP8 5.0 PFLOPS dense, "
         "7 Infinity Fabric links of 153.6 GB/s (bidirectional)", "mesh"),
)}


def hardware_names() -> list[str]:
    return sorted(BUILTIN) + ["local"]


def get_hardware(name: str, profile_path: str = DEFAULT_PROFILE, gpus_per_node: int = 0,
                 link_bw: float = 0.0) -> Hardware:
    """A built-in profile by name, or ``"local"``: the calibrated profile at ``profile_path``.

    ``gpus_per_node`` > 0 and ``link_bw`` > 0 (bytes/s per link and direction) override the
    profile's. Raises ValueError for an unknown name or a missing/invalid calibration file (with
    the command that writes it).
    """
    key = name.strip().lower()
    if key == "local":
        path = os.path.expanduser(profile_path)
        if not os.path.isfile(path):
            raise ValueError(f"no calibrated profile at {path}: run `cleave plan --calibrate` first")
        try:
            with open(path, encoding="utf-8") as f:
                hw = Hardware.from_json(json.load(f))
        except (OSError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"calibrated profile {path} is unreadable ({exc}): run `cleave plan --calibrate` again") from None
    elif key in BUILTIN:
        hw = BUILTIN[key]
    else:
        raise ValueError(f"unknown hardware {name!r}; choose one of {hardware_names()}")
    return with_overrides(hw, gpus_per_node, link_bw)


def with_overrides(hw: Hardware, gpus_per_node: int = 0, link_bw: float = 0.0) -> Hardware:
    """``hw`` with ``gpus_per_node`` and ``link_bw`` (bytes/s per link) replaced where > 0; the
    result is validated again (a mesh must still reach every peer)."""
    if link_bw < 0:
        raise ValueError(f"link bandwidth must be positive, got {link_bw / GB:g} GB/s")
    changes = {k: v for k, v in (("gpus_per_node", gpus_per_node), ("link_bw", link_bw)) if v}
    return replace(hw, **changes) if changes else hw
