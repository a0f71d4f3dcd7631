"""Contracts the router and the workers share, owned by neither front door nor worker.

Error classes and their gRPC/HTTP status mapping (``common.errors``), the config dataclasses
every process is built from (``common.config``), the model's shape and its KV cache
(``common.model``), parallel layouts and how they split a model (``common.layout``), the network
interface of an address (``common.net``), the worker registry in Redis (``common.registry``), the
routers' latency samples (``common.metrics``), the Prometheus metric sets (``common.prom``), the
internal-API token and service helpers (``common.grpc_util``) and the environment variables
(``common.environment``). This is the floor: nothing here imports another Cleave package, and
nothing here imports torch at module level.
"""
