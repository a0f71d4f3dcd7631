"""``cleave bench``: a load generator for a running Cleave (gRPC or the OpenAI HTTP API).

``datasets`` makes the requests, ``backends`` sends one and times it, ``runner`` applies a
load (fixed concurrency or Poisson rate, warm-up), ``report`` turns timings into TTFT, TPOT,
ITL, throughput and goodput, and ``cli`` is the ``cleave bench`` subcommand.
"""
