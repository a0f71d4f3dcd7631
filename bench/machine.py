"""The machine a benchmark ran on, for the header of every bench script that prints CPU timings.

Cleave's CPU figures rest on the vendor kernels torch picks for this CPU: oneDNN's AMX tiles for
bf16 matmuls (``--weights-dtype bf16``, the int8/int4 kernels' bf16 activations) where the CPU
has AMX, AVX-512-BF16 / AVX-512-VNNI otherwise, ATen's AVX-512 or AVX2 vector loops, MKL's
sgemm for fp32. The same bench on another x86 server can differ by several times, so every
table says which CPU and which of those features it had::

    CPU: Intel(R) Xeon(R) Processor (GenuineIntel family 6 model 167), 2 logical CPUs;
    AMX yes, AVX-512-BF16 yes, AVX-512-VNNI yes, AVX-512 yes, AVX2 yes; torch CPU capability AVX512

The flags come from ``/proc/cpuinfo`` (Linux; elsewhere the model is ``platform.processor()``
and the features unknown); the capability is ``torch.backends.cpu.get_cpu_capability()``, the
ATen kernels torch dispatches to. Environment variables that cap the kernels below the CPU
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``) are named when set.
"""
from __future__ import annotations

import os
import platform

CPUINFO = "/proc/cpuinfo"
# (name printed, /proc/cpuinfo flags that must all be present)
FEATURES = (("AMX", ("amx_tile", "amx_bf16")), ("AVX-512-BF16", ("avx512_bf16",)),
            ("AVX-512-VNNI", ("avx512_vnni",)), ("AVX-512", ("avx512f",)), ("AVX2", ("avx2",)))
CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's ``key: value`` fields of a ``/proc/cpuinfo`` text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break                       # one processor is enough: they are alike
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_features(flags: set[str]) -> dict[str, bool]:
    """Which of :data:`FEATURES` a set of ``/proc/cpuinfo`` flags has."""
    return {name: all(f in flags for f in needs) for name, needs in FEATURES}


def describe(cpuinfo: str | None = None, environ: dict[str, str] | None = None) -> str:
    """One line: the CPU model, its features among :data:`FEATURES`, torch's capability, and
    the kernel caps set in ``environ``. ``cpuinfo``: a ``/proc/cpuinfo`` text (default: read it)."""
    environ = os.environ if environ is None else environ
    if cpuinfo is None:
        try:
            with open(CPUINFO) as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields = parse_cpuinfo(cpuinfo)
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    where = " ".join(f"{label}{fields[key]}" for key, label in
                     (("vendor_id", ""), ("cpu family", "family "), ("model", "model ")) if key in fields)
    line = f"CPU: {model}{f' ({where})' if where else ''}, {os.cpu_count()} logical CPUs; "
    if "flags" in fields:
        have = cpu_features(set(fields["flags"].split()))
        line += ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in have.items())
    else:
        line += "features unknown (no /proc/cpuinfo flags)"
    line += f"; torch CPU capability {_capability()}"
    caps = [f"{name}={environ[name]}" for name in CAPS if environ.get(name)]
    return line + (f"; capped by {', '.join(caps)}" if caps else "")


def _capability() -> str:
    try:
        import torch
        return torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        return "unknown"
