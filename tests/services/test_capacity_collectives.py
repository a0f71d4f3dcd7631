"""Collective times by algorithm, computed by hand from the formulas' sources
(``services/capacity/collectives.py``), the algorithm NCCL/RCCL would pick, and what the node's
topology (switch vs full mesh) does to them. Pure Python."""
from __future__ import annotations

from dataclasses import replace

import pytest

from services.capacity import collectives
from services.capacity.collectives import Fabric
from services.capacity.hardware import BUILTIN as GPUS, Hardware, with_overrides

pytestmark = pytest.mark.unit

A = 1e-6                     # seconds per step inside a node
# a switch node: one 10 GB/s link per GPU to the switch; NICs of 1 GB/s, 10 us per step
SWITCH = Hardware(name="switch", memory_bytes=80e9, flops={"bf16": 1e12}, mem_bw=1e11, link_bw=1e10,
                  link_latency_s=A, nic_bw=1e9, nic_latency_s=1e-5, gpus_per_node=8, flops_eff=1.0,
                  mem_eff=1.0, link_eff=1.0)
# a full mesh of 8: seven 10 GB/s links per GPU, one to each peer; its switch twin has the same
# 70 GB/s per GPU, all of it towards any peer
MESH = replace(SWITCH, name="mesh", topology="mesh", links_per_gpu=7)
TWIN = replace(MESH, name="twin", topology="switch")


def test_ring_tree_one_shot_by_hand_on_a_switch():
    s = 1e6
    # ring: 2(n-1) steps, each byte crosses 2(n-1)/n links' worth
    assert collectives.time_of("all_reduce", "ring", s, 4, SWITCH.fabric(4)) == pytest.approx(6 * A + 1.5 * s / 1e10)
    # one-shot: one step, a rank reads the n-1 peers' whole buffers
    assert collectives.time_of("all_reduce", "one_shot", s, 4, SWITCH.fabric(4)) == pytest.approx(A + 3 * s / 1e10)
    assert SWITCH.collective("all_reduce", s, 4) == (pytest.approx(6 * A + 1.5 * s / 1e10), "ring")
    # small messages: one-shot; crossover where 5 steps = 1.5 S / bw, S = 33,333 bytes
    assert SWITCH.collective("all_reduce", 1e3, 4) == (pytest.approx(A + 3e3 / 1e10), "one_shot")
    assert SWITCH.collective("all_reduce", 30e3, 4)[1] == "one_shot"
    assert SWITCH.collective("all_reduce", 40e3, 4)[1] == "ring"
    # no tree inside a node (NCCL chains it there): never offered
    assert "tree" not in collectives.available("all_reduce", SWITCH.fabric(8))
    # all-to-all: S/n to every peer at once; send/recv: one peer
    assert SWITCH.comm_time("all_to_all", s, 4) == pytest.approx(A + 0.75 * s / 1e10)
    assert SWITCH.comm_time("send_recv", s, 2) == pytest.approx(A + s / 1e10)
    assert SWITCH.collective("all_reduce", s, 1) == (0.0, "") and SWITCH.comm_time("all_reduce", 0, 8) == 0


def test_across_nodes_the_tree_beats_the_ring_on_latency_then_loses_on_bandwidth():
    a = 1e-5
    s = 1e6                  # ring 30 steps + 1.875 S / nic; tree 2 log2(16) = 8 steps + 2 S / nic
    assert collectives.time_of("all_reduce", "ring", s, 16, SWITCH.fabric(16, True)) == pytest.approx(30 * a + 1.875e-3)
    assert SWITCH.collective("all_reduce", s, 16, crosses_node=True) == (pytest.approx(8 * a + 2e-3), "tree")
    # tree wins below 22 steps = 0.125 S / nic: S < 1.76 MB
    assert SWITCH.collective("all_reduce", 4e6, 16, crosses_node=True) == (pytest.approx(30 * a + 7.5e-3), "ring")
    # no one-shot across nodes (no load/store over a NIC)
    assert "one_shot" not in collectives.available("all_reduce", SWITCH.fabric(16, True))
    assert SWITCH.comm_time("send_recv", s, 2, crosses_node=True) == pytest.approx(a + s / 1e9)


def test_a_mesh_pair_talks_over_one_link_a_mesh_group_over_n_minus_one():
    s = 1e6
    # 2 GPUs of a mesh: one 10 GB/s link (one-shot and ring move S each way; one-shot saves a step)
    assert MESH.fabric(2) == Fabric(ring_bw=1e10, peer_bw=1e10, fanout_bw=1e10, alpha_s=A)
    assert MESH.collective("all_reduce", s, 2) == (pytest.approx(A + s / 1e10), "one_shot")
    # its switch twin gives the pair all 70 GB/s: 7x faster
    assert TWIN.collective("all_reduce", s, 2) == (pytest.approx(A + s / 7e10), "one_shot")
    # 8 GPUs: seven rings over the seven links: 70 GB/s, the same as the twin's
    assert MESH.fabric(8).ring_bw == pytest.approx(7e10)
    assert MESH.collective("all_reduce", s, 8) == (pytest.approx(14 * A + 1.75 * s / 7e10), "ring")
    assert MESH.comm_time("all_reduce", s, 8) == pytest.approx(TWIN.comm_time("all_reduce", s, 8))
    # 4 GPUs: three links
    assert MESH.comm_time("all_reduce", s, 4) == pytest.approx(6 * A + 1.5 * s / 3e10)
    # all-to-all over the n - 1 links at once; a send over one link
    assert MESH.comm_time("all_to_all", s, 8) == pytest.approx(A + 7 / 8 * s / 7e10)
    assert MESH.comm_time("send_recv", s, 2) == pytest.approx(A + s / 1e10)
    # two links to each peer (14 links, 8 GPUs)
    assert replace(MESH, links_per_gpu=14).fabric(2).peer_bw == pytest.approx(2e10)


def test_builtin_profiles_state_their_topology():
    for name in ("h100", "h200", "b200", "a100"):
        assert GPUS[name].topology == "switch" and GPUS[name].links_per_gpu >= 12
    assert GPUS["h100"].gpu_link_bw == pytest.approx(450e9)          # 18 NVLink 4 links of 25 GB/s
    for name in ("mi300x", "mi325x", "mi355x"):
        hw = GPUS[name]
        assert hw.topology == "mesh" and hw.links_per_gpu == hw.gpus_per_node - 1 == 7
    mi = GPUS["mi300x"]                                              # 64 GB/s per link, 0.8 of it
    assert mi.comm_time("all_reduce", 1e8, 8) == pytest.approx(14 * 2e-6 + 1.75 * 1e8 / (7 * 64e9 * 0.8))
    assert mi.comm_time("send_recv", 1e8, 2) == pytest.approx(2e-6 + 1e8 / (64e9 * 0.8))


def test_topology_is_validated_with_the_values():
    with pytest.raises(ValueError, match=r"needs a link to each of 7 peers, got links_per_gpu=3"):
        replace(MESH, links_per_gpu=3)
    with pytest.raises(ValueError, match=r"gpus_per_node=16 needs a link to each of 15 peers"):
        with_overrides(GPUS["mi300x"], gpus_per_node=16)
    with pytest.raises(ValueError, match=r"topology must be 'switch' or 'mesh', got 'torus'"):
        replace(SWITCH, topology="torus")
    with pytest.raises(ValueError, match=r"links_per_gpu must be >= 1, got 0"):
        replace(SWITCH, links_per_gpu=0)
    with pytest.raises(ValueError, match=r"ring_bw must be positive bytes/s, got 0"):
        Fabric(ring_bw=0, peer_bw=1, fanout_bw=1, alpha_s=0)
    with pytest.raises(ValueError, match=r"no algorithm 'tree' for 'all_to_all'"):
        collectives.terms("all_to_all", "tree", 4)
    assert with_overrides(GPUS["mi300x"], link_bw=128e9).fabric(2).peer_bw == pytest.approx(128e9 * 0.8)


def test_fit_recovers_alpha_and_bandwidth_from_gloo_like_times():
    alpha, bw = 2e-4, 3e9
    fab = Fabric(bw, bw, bw, alpha)
    measured = {op: {n: [[b, collectives.time_of(op, collectives.GLOO_ALGORITHM[op], b, n, fab)]
                         for b in (1 << 10, 1 << 17, 1 << 23)] for n in ((2,) if op == "send_recv" else (2, 3, 4))}
                for op in collectives.OPS}
    a, b = collectives.fit_alpha_beta(measured)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(bw, rel=1e-6)
    errors = collectives.fit_errors(measured, a, b)
    assert len(errors) == 3 * 3 + 3 * 3 + 3 and max(abs(e["error"]) for e in errors) < 1e-6
    # noise on one point moves the fit but keeps both terms positive
    measured["all_reduce"][2][0][1] *= 5
    a, b = collectives.fit_alpha_beta(measured)
    assert a > 0 and b > 0
    with pytest.raises(ValueError, match="no measured collective times"):
        collectives.fit_alpha_beta({})
