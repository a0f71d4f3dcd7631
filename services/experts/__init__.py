"""Expert load balancing (EPLB) for MoE decode pools, in one package.

- ``stats``: routed-token counts per expert in Redis (cumulative hashes and windowed buckets);
- ``placement``: the balancers (greedy floor, DeepSeek's EPLB, and the refined one in use);
- ``balance``: the pool's recorded placement in Redis (compare-and-set on its version), the
  rebalancer, the load view operators read (``GetModelInfo``, ``cleave rebalance``);
- ``instance``: one decode instance's writer and balancer, and the package's one hook into the
  engine: the executor's ``expert_counts()``, ``apply_placement()`` and ``rank_pairs()``.

The engine holds and moves experts (``engine.moe``, ``engine.expert_move``) and defines a
placement (``engine.expert_placement``); it knows nothing of Redis or of when to rebalance.
"""
