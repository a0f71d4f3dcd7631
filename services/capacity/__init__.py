"""Capacity and layout planning (``cleave plan``): which TP/PP/CP/EP layout and how many
instances each pool should run, for a model, a hardware profile, a workload and SLOs.

Modules, in data-flow order:

- :mod:`services.capacity.models` — the models to plan for: the engine's model shape
  (``common.model.ModelConfig``: KV bytes per token, element formats) with a name and parameter
  counts, built-in or from a Hugging Face ``config.json``; no torch import.
- :mod:`services.capacity.hardware` — datasheet profiles of GPUs and their node topology
  (switch or full mesh), the calibrated ``local`` profile (JSON written by
  :mod:`services.capacity.calibrate`); :mod:`services.capacity.hardware_file` reads a custom one
  from YAML.
- :mod:`services.capacity.collectives` — ring / tree / one-shot / direct collectives, their
  alpha-beta times and the choice NCCL/RCCL make between them.
- :mod:`services.capacity.cost` — the per-phase cost model: every term (compute, memory
  traffic, TP/PP/EP/CP communication, KV handoff) as a visible field of a breakdown; a decode
  step's per-token latency apart from the instance's throughput.
- :mod:`services.capacity.memory` — memory per GPU, KV room, the largest batch that fits.
- :mod:`services.capacity.search` — enumerate layouts × instances, rank them, recommend.
- :mod:`services.capacity.sweep` — one dimension varied (``cleave plan sweep``), where returns
  diminish or turn negative.
- :mod:`services.capacity.report` — tables, JSON and Helm values of a plan.
- :mod:`services.capacity.published` — the recommendation kept in Redis, read back by the
  router's ``GetModelInfo`` next to measured latencies.

Importing this package never imports torch: ``cleave plan`` answers in well under a second.
"""
