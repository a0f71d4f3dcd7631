"""``cleave bench``: a load generator for a running Cleave (gRPC or the OpenAI HTTP API).

``datasets`` makes the requests, ``backends`` sends one and times it, ``runner`` applies a
load (fixed concurrency or Poisson rate, warm-up), ``conversations`` runs multi-turn
conversations (each turn's prompt the whole history) under such a load, ``report`` turns
timings into TTFT, TPOT, ITL, throughput, goodput and prefix-cache hit rates, and ``cli`` is
the ``cleave bench`` subcommand.
"""
