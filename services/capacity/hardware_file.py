"""A custom hardware profile from a YAML file (``cleave plan --hardware-file FILE.yaml``).

Keys carry their units; every one is optional when ``base`` names a built-in profile to start
from (the "what if our links were twice as fast" case), else the first group is required::

    name: my-node                 # required without base
    base: mi300x                  # a built-in profile to start from (h100, ..., mi355x)
    memory_gb: 192                # device memory, GB (1e9 bytes)
    tflops: {bf16: 1307.4, fp8: 2614.9}   # dense peak TFLOP/s per compute dtype
    hbm_tb_s: 5.3                 # memory bandwidth, TB/s
    gpus_per_node: 8
    topology: mesh                # switch (NVSwitch-like) or mesh (links join GPUs pairwise)
    link_gb_s: 64                 # one intra-node link, GB/s per direction
    nic_gb_s: 50                  # each GPU's NIC, GB/s per direction
    links_per_gpu: 7              # default: switch 1, mesh gpus_per_node - 1
    link_latency_us: 2            # per collective step inside a node (default 2)
    nic_latency_us: 5             # per step across nodes (default 5)
    flops_eff: 0.7                # share of peak reached (defaults: 0.7, 0.8, 0.8)
    mem_eff: 0.8
    link_eff: 0.8
    layer_overhead_us: 20         # launches per decoder layer per forward (default 20)
    source: "vendor datasheet, URL"

Errors are ValueErrors naming the file, the key and the value.
"""
from __future__ import annotations

import os
from dataclasses import replace

from services.capacity.hardware import BUILTIN, GB, TB, Hardware

# key -> (Hardware field, scale to SI units)
_SCALED = {"memory_gb": ("memory_bytes", GB), "hbm_tb_s": ("mem_bw", TB), "link_gb_s": ("link_bw", GB),
           "nic_gb_s": ("nic_bw", GB), "link_latency_us": ("link_latency_s", 1e-6),
           "nic_latency_us": ("nic_latency_s", 1e-6), "layer_overhead_us": ("layer_overhead_s", 1e-6),
           "flops_eff": ("flops_eff", 1.0), "mem_eff": ("mem_eff", 1.0), "link_eff": ("link_eff", 1.0)}
_INTS = ("gpus_per_node", "links_per_gpu")
_TEXT = ("name", "base", "topology", "source")
KEYS = tuple(sorted((*_SCALED, *_INTS, *_TEXT, "tflops")))
REQUIRED = ("name", "memory_gb", "tflops", "hbm_tb_s", "gpus_per_node", "topology", "link_gb_s", "nic_gb_s")


def _number(path: str, key: str, value, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: {key} must be a number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{path}: {key} must be positive, got {value!r}")
    return float(value)


def profile_from_dict(data: dict, path: str = "<hardware file>") -> Hardware:
    """A validated :class:`Hardware` from the parsed YAML mapping (module doc for the keys)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of keys ({', '.join(KEYS)}), got {type(data).__name__}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {', '.join(KEYS)}")
    fields: dict = {}
    for key in _TEXT:
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"{path}: {key} must be a string, got {data[key]!r}")
    for key, (field, scale) in _SCALED.items():
        if key in data:
            fields[field] = _number(path, key, data[key], positive=not key.endswith("_us")) * scale
            if fields[field] < 0:
                raise ValueError(f"{path}: {key} must be >= 0, got {data[key]!r}")
    for key in _INTS:
        if key in data:
            if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 1:
                raise ValueError(f"{path}: {key} must be a whole number >= 1, got {data[key]!r}")
            fields[key] = data[key]
    if "tflops" in data:
        t = data["tflops"]
        if not isinstance(t, dict) or not t:
            raise ValueError(f"{path}: tflops must map compute dtypes to TFLOP/s (e.g. {{bf16: 989}}), got {t!r}")
        fields["flops"] = {str(k): _number(path, f"tflops.{k}", v) * TB for k, v in t.items()}
    for key in ("topology", "source", "name"):
        if key in data:
            fields[key] = data[key]
    base = data.get("base")
    if base is not None:
        if base.lower() not in BUILTIN:
            raise ValueError(f"{path}: base {base!r} is not a built-in profile ({', '.join(sorted(BUILTIN))})")
        hw = BUILTIN[base.lower()]
        fields.setdefault("name", f"{hw.name}-custom")
        fields["source"] = fields.get("source") or f"{path}: {hw.name} with {sorted(set(data) - {'base'})} changed"
        return replace(hw, **fields)
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (or name a built-in profile as base)")
    if "links_per_gpu" not in fields and fields["topology"] == "mesh":
        fields["links_per_gpu"] = max(1, fields["gpus_per_node"] - 1)
    fields.setdefault("link_latency_s", 2e-6)
    fields.setdefault("nic_latency_s", 5e-6)
    fields.setdefault("source", path)
    return Hardware(**fields)


def load_hardware_file(path: str) -> Hardware:
    """:func:`profile_from_dict` of the YAML file at ``path``; ValueError if unreadable."""
    import yaml
    full = os.path.expanduser(path)
    try:
        with open(full, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"hardware file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"hardware file {path} is not valid YAML: {exc}") from None
    return profile_from_dict(data, path)
