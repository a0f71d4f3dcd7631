"""The operator views the deployable router adds to ``GetModelInfo``.

``services.cli`` (``cleave router``, and so ``cleave serve``, which runs that command) passes
:data:`MODEL_INFO_VIEWS` to :func:`router.server.serve_router`; the router awaits each with
``(info, core)`` on every ``GetModelInfo`` call, in this order. They live here, not in the
router, because they read state that the workers and the planner own: the MoE decode pool's
expert load (``services.experts``) and the published capacity plan beside the
measured latencies (``services.capacity.published``). Both log Redis errors and never raise.
"""
from __future__ import annotations

from services.capacity.published import add_plan_view


async def expert_load_view(info, core) -> None:
    """MoE models only: the decode pool's expert load and placement (``ModelInfo`` fields 20-23)."""
    if core.model.num_experts:
        # imported here: its statistics reader (services.experts.stats) loads torch, which a
        # dense model's router never needs
        from services.experts.balance import add_expert_view
        await add_expert_view(info, core.cfg.redis_url, core.cfg.key_prefix, core.model_id)


async def capacity_plan_view(info, core) -> None:
    """The published capacity plan per pool, beside the measured p90 latency (fields 30-39)."""
    await add_plan_view(info, core.client, core.cfg.key_prefix)


MODEL_INFO_VIEWS = (expert_load_view, capacity_plan_view)
