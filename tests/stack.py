"""Helpers for tests that run the real stack as processes (``services.launcher.LocalStack``)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import urllib.error
import urllib.request

import grpc
import redis
from prometheus_client.parser import text_string_to_metric_families

from cleave.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from common.grpc_util import token_metadata
from common.registry import read_workers
from services.launcher import LocalStack, StackConfig


@dataclasses.dataclass
class Result:
    token_ids: list[int]
    text: str
    chunks: list[str]
    finish_reason: int
    usage: inference_pb2.Usage
    request_id: str


class RunningStack:
    """A started LocalStack plus the clients tests need."""

    def __init__(self, cfg: StackConfig) -> None:
        self.stack = LocalStack(cfg)
        self.address = self.stack.start()
        self.http_url = self.stack.http_url  # the OpenAI-compatible API, ending in /v1
        self.channel = grpc.insecure_channel(self.address)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.redis = redis.Redis.from_url(self.stack.redis_url, decode_responses=True,
                                          password=self.stack.redis_password or None)

    def close(self) -> None:
        self.channel.close()
        self.redis.close()
        self.stack.stop()

    def generate(self, prompt=None, token_ids=None, chat=None, request_id="", timeout=120, **sampling) -> Result:
        req = request(prompt=prompt, token_ids=token_ids, chat=chat, request_id=request_id, **sampling)
        ids, chunks, last = [], [], None
        for msg in self.stub.Generate(req, timeout=timeout):
            ids.extend(msg.token_ids)
            chunks.append(msg.text)
            last = msg
        return Result(ids, "".join(chunks), chunks, last.finish_reason, last.usage, last.request_id)

    def workers(self):
        import redis.asyncio as aioredis

        async def read():
            client = aioredis.from_url(self.stack.redis_url, decode_responses=True,
                                       password=self.stack.redis_password or None)
            try:
                return await read_workers(client, "cleave:")
            finally:
                await client.aclose()
        return asyncio.run(read())

    def worker_infos(self, exclude: tuple[str, ...] = ()) -> dict[str, worker_pb2.WorkerInfo]:
        """Info of every registered worker but ``exclude`` (ids of workers known to be dead)."""
        infos = {}
        for rec in self.workers():
            if rec.worker_id in exclude:
                continue
            with grpc.insecure_channel(rec.address) as ch:
                stub = (worker_pb2_grpc.PrefillStub if rec.pool == "prefill" else worker_pb2_grpc.DecodeStub)(ch)
                infos[rec.worker_id] = stub.Info(worker_pb2.InfoRequest(), timeout=10,
                                                 metadata=token_metadata(self.stack.token))
        return infos

    def free_blocks(self, exclude: tuple[str, ...] = ()) -> dict[str, int]:
        return {wid: info.free_blocks for wid, info in self.worker_infos(exclude).items()}

    def wait_free_blocks(self, expected: dict[str, int], timeout: float = 15.0) -> dict[str, int]:
        """Poll until every worker's free-block count equals ``expected``; returns the last seen."""
        deadline = time.time() + timeout
        while True:
            seen = self.free_blocks()
            if seen == expected or time.time() > deadline:
                return seen
            time.sleep(0.1)


def request(prompt=None, token_ids=None, chat=None, request_id="", **sampling) -> inference_pb2.GenerateRequest:
    params = inference_pb2.SamplingParams(**sampling)
    req = inference_pb2.GenerateRequest(request_id=request_id, sampling=params)
    if prompt is not None:
        req.prompt = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    elif chat is not None:
        req.chat.messages.extend(inference_pb2.ChatMessage(role=r, content=c) for r, c in chat)
    return req


# ---- HTTP, metrics and processes of a running stack ---------------------------------------

def post_json(stack, path: str, body: dict, timeout: float = 120, headers: dict | None = None):
    """(status, parsed JSON) of a raw POST to ``path`` under ``/v1`` (errors included)."""
    req = urllib.request.Request(stack.http_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def scrape_metrics(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric_value(samples, name: str, **labels) -> float:
    return sum(v for (n, lbl), v in samples.items()
               if n == name and all(dict(lbl).get(k) == x for k, x in labels.items()))


def child_pids(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
