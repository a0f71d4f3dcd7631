"""Every environment variable Cleave reads, declared once, typed.

Flags take precedence where both exist; the environment is for what deployments inject
(Kubernetes Secrets and ConfigMaps) and for CLI defaults.

| variable | read by | meaning |
| --- | --- | --- |
| ``CLEAVE_LOG_LEVEL`` | every ``cleave`` command | default of ``--log-level`` (INFO) |
| ``CLEAVE_ADDRESS`` | ``cleave generate`` / ``info`` | default router address (127.0.0.1:50051) |
| ``CLEAVE_REDIS_PASSWORD`` | every process that opens Redis | password used when the Redis URL carries none |
| ``CLEAVE_INTERNAL_TOKEN`` | workers, routers, ``cleave serve`` | shared secret the internal worker APIs require (``authorization: Bearer <token>``); empty = no check. ``cleave serve`` makes one per run when unset |
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class Environment:
    log_level: str = "INFO"
    address: str = "127.0.0.1:50051"
    redis_password: str = field(default="", repr=False)
    internal_token: str = field(default="", repr=False)

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> "Environment":
        env = os.environ if environ is None else environ
        return cls(log_level=env.get("CLEAVE_LOG_LEVEL", cls.log_level),
                   address=env.get("CLEAVE_ADDRESS", cls.address),
                   redis_password=env.get("CLEAVE_REDIS_PASSWORD", ""),
                   internal_token=env.get("CLEAVE_INTERNAL_TOKEN", ""))
