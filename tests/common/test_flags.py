"""One config path: flags come from the config dataclasses (``common.flags``), every flag has a
help text, flags and the launcher's JSON build the same configs, and ``cleave serve``'s flags
reach its workers' and router's configs."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from common.config import RouterConfig
from common.flags import add_arguments, from_args, from_json, replace, to_json
from common.layout import ParallelConfig
from engine.runtime.config import Rendezvous, RuntimeConfig
from services.cli import _parser, _worker_config, pool_layouts
from services.config import WorkerConfig

pytestmark = pytest.mark.unit


def _subparsers(parser: argparse.ArgumentParser):
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def test_every_flag_of_every_command_has_help():
    missing = [f"{prog}: {'/'.join(a.option_strings) or a.dest}"
               for prog, p in _subparsers(_parser()) for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not (a.help or "").strip()]
    assert not missing, missing


def test_worker_flags_build_the_nested_config():
    args = _parser().parse_args(
        "worker decode --model m --host 10.0.0.2 --tp 2 --pp 2 --kv-cache-mb 256 --no-checksum --cpus 0-3 "
        "--threads 1 --transport tcp --weights-dtype int8 --no-cuda-graphs --max-reservation 30 "
        "--redundant-experts 2 --master-port 1234 --rendezvous-timeout 9".split())
    cfg = _worker_config(args)
    rt = cfg.runtime
    assert (cfg.pool, cfg.max_reservation_s, cfg.redundant_experts) == ("decode", 30.0, 2)
    assert (rt.model, rt.host, rt.parallel, rt.kv_cache_bytes, rt.checksum) == \
        ("m", "10.0.0.2", ParallelConfig(tp=2, pp=2), 256 << 20, False)
    assert (rt.cpus, rt.threads, rt.transport, rt.weights_dtype, rt.cuda_graphs) == \
        ((0, 1, 2, 3), 1, "tcp", "int8", False)
    assert rt.rendezvous == Rendezvous(master_port=1234, timeout_s=9.0)   # a worker is rank 0


def test_defaults_of_flags_are_the_dataclass_defaults(monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert _worker_config(_parser().parse_args(["worker", "prefill"])) == WorkerConfig(pool="prefill")
    args = _parser().parse_args(["router", "--redis-url", "redis://r:1/0"])
    assert from_args(RouterConfig, args) == RouterConfig(redis_url="redis://r:1/0")


def test_rank_flags_fall_back_to_torchrun_variables(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("RANK", "3")
    args = _parser().parse_args("rank decode --tp 2 --pp 2 --master-port 29500".split())
    rdv = _worker_config(args).runtime.rendezvous
    assert (rdv.master_addr, rdv.master_port, rdv.rank) == ("10.0.0.1", 29500, 3)
    args = _parser().parse_args("worker decode --tp 2 --pp 2 --master-port 29500".split())
    assert _worker_config(args).runtime.rendezvous.rank == -1          # RANK is not a worker's


def test_json_round_trip_and_the_secret_stays_out():
    cfg = replace(WorkerConfig(pool="decode", internal_token="s3cret"), tp=2, cpus=(1, 2), num_blocks=7,
                  rendezvous=Rendezvous(nproc_per_node=1, master_port=5))
    text = to_json(cfg)
    assert "s3cret" not in text
    assert from_json(WorkerConfig, text, internal_token="s3cret") == cfg
    args = _parser().parse_args(["worker", "decode", "--config-json", text])
    assert dataclasses.replace(_worker_config(args), internal_token="s3cret") == cfg
    router = RouterConfig(port=1, http_port=2, transfer_timeout_s=5.0, internal_token="t")
    assert from_json(RouterConfig, to_json(router), internal_token="t") == router


def test_config_json_refuses_other_flags_and_the_wrong_pool():
    text = to_json(WorkerConfig(pool="decode"))
    with pytest.raises(ValueError, match="drop --tp"):
        _worker_config(_parser().parse_args(["worker", "decode", "--config-json", text, "--tp", "2"]))
    with pytest.raises(ValueError, match="is a decode config, the command says prefill"):
        _worker_config(_parser().parse_args(["worker", "prefill", "--config-json", text]))
    with pytest.raises(ValueError, match=r"unknown WorkerConfig fields \['bogus'\]"):
        from_json(WorkerConfig, '{"pool": "decode", "bogus": 1}')


def test_replace_by_flat_name_validates_and_names_unknown_fields():
    cfg = replace(WorkerConfig(pool="prefill"), cp=2, block_size=8, drain_timeout_s=1.0)
    assert (cfg.runtime.parallel.cp, cfg.runtime.block_size, cfg.drain_timeout_s) == (2, 8, 1.0)
    with pytest.raises(ValueError, match=r"WorkerConfig has no fields \['kv_cache_mb'\]"):
        replace(cfg, kv_cache_mb=1)
    with pytest.raises(ValueError, match="prefill instance is laid out tp x cp; got pp=2"):
        replace(cfg, pp=2)


def test_serve_flags_reach_the_worker_and_router_configs(monkeypatch):
    import services.cli as cli
    import services.serve

    seen = []
    monkeypatch.setattr(services.serve, "run_stack", lambda cfg: seen.append(cfg) or 0)
    monkeypatch.setattr(cli, "check_layouts", lambda *a: None)
    argv = ("serve --port 6000 --model m --decode-instances 2 --transport tcp --kv-cache-mb 64 --threads 1 "
            "--weights-dtype int4 --prefill-tp 2 --prefill-cp 2 --decode-pp 2 --redundant-experts 1 --cpus 0-3 "
            "--no-pin-cores --ready-timeout 9").split()
    args = _parser().parse_args(argv)
    assert pool_layouts(args) == (ParallelConfig(tp=2, cp=2), ParallelConfig(pp=2))
    assert cli._run_serve(args) == 0
    cfg = seen[0]
    assert (cfg.port, cfg.http_port, cfg.model, cfg.decode_instances, cfg.cpus, cfg.pin_cores, cfg.ready_timeout_s) \
        == (6000, 8000, "m", 2, (0, 1, 2, 3), False, 9.0)
    for worker in (cfg.prefill, cfg.decode):
        rt = worker.runtime
        assert (rt.transport, rt.kv_cache_bytes, rt.threads, rt.weights_dtype) == ("tcp", 64 << 20, 1, "int4")
    assert cfg.prefill.runtime.parallel == ParallelConfig(tp=2, cp=2) and cfg.prefill.redundant_experts == 0
    assert cfg.decode.runtime.parallel == ParallelConfig(pp=2) and cfg.decode.redundant_experts == 1


def test_a_field_with_option_metadata_is_a_flag():
    """What adding a worker flag takes: a field with ``option(...)``; nothing else."""
    from common.flags import option

    @dataclasses.dataclass(frozen=True)
    class Demo:
        kv_cache_bytes: int = option(1 << 20, flag="--kv-mb", to_field=lambda mb: mb << 20,
                                     from_field=lambda b: b >> 20, help="size")
        fast: bool = option(False, help="go fast")
        layout: ParallelConfig = option(default_factory=ParallelConfig, nested=True, help="{NAME} degree")
        hidden: int = 3

    parser = argparse.ArgumentParser()
    add_arguments(Demo, parser)
    assert {a.dest for a in parser._actions} == {"help", "kv_mb", "fast", "tp", "pp", "cp", "ep"}
    assert from_args(Demo, parser.parse_args(["--kv-mb", "2", "--fast", "--ep", "2"])) == \
        Demo(kv_cache_bytes=2 << 20, fast=True, layout=ParallelConfig(ep=2))
    assert from_args(Demo, parser.parse_args([])) == Demo()
    assert RuntimeConfig().kv_cache_bytes == 1 << 30
