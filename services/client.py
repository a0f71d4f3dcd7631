"""Client side of the public API: ``cleave generate`` and ``cleave info``, over plain gRPC stubs."""
from __future__ import annotations

import sys

import grpc

from cleave.v1 import inference_pb2, inference_pb2_grpc


def build_request(args) -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        stop=args.stop, ignore_eos=args.ignore_eos)
    if args.seed is not None:
        sampling.seed = args.seed
    req = inference_pb2.GenerateRequest(sampling=sampling)
    if args.chat or args.system:
        messages = ([inference_pb2.ChatMessage(role="system", content=args.system)] if args.system else [])
        messages.append(inference_pb2.ChatMessage(role="user", content=args.prompt))
        req.chat.messages.extend(messages)
    else:
        req.prompt = args.prompt
    return req


def generate_cli(args) -> int:
    with grpc.insecure_channel(args.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            last = None
            for msg in stub.Generate(build_request(args)):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                last = msg
            sys.stdout.write("\n")
            if args.show_usage and last is not None:
                reason = inference_pb2.FinishReason.Name(last.finish_reason)
                print(f"[{last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} completion "
                      f"tokens, {reason}]", file=sys.stderr)
        except grpc.RpcError as exc:
            print(f"\ncleave generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def info_cli(args) -> int:
    with grpc.insecure_channel(args.address) as channel:
        try:
            info = inference_pb2_grpc.InferenceStub(channel).GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
        except grpc.RpcError as exc:
            print(f"cleave info: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(info)
    for pool in info.pools:   # the KV index (issue 22): how this router knows what each pool caches
        print(f"{pool.pool} KV index: {pool.kv_index_mode or 'unknown'}, {pool.kv_index_blocks} blocks indexed")
    return 0
