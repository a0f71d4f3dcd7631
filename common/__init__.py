"""Contracts the router and the workers share, owned by neither front door nor worker.

Error classes and their gRPC/HTTP status mapping (``common.errors``), the config dataclasses
every process is built from (``common.config``), the worker registry in Redis
(``common.registry``), the routers' latency samples (``common.metrics``), the Prometheus
metric sets (``common.prom``), the internal-API token and service helpers
(``common.grpc_util``) and the environment variables (``common.environment``). Nothing here
imports ``router`` or ``services``.
"""
