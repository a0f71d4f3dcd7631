"""Windowed expert statistics and placement records against a real ``redis-server``.

- Two writers' increments land in the same time bucket and add up; the cumulative DESIGN §7
  hash holds exactly the totals it held before windows existed; a bucket older than the window
  is expired by Redis itself and no longer read.
- The placement record: compare-and-set publishing (one winner per version), the decode-side
  :class:`ExpertBalancer` (default record on start, follows new versions, periodic rebalance
  past the threshold only), ``rebalance`` and the load view.
"""
from __future__ import annotations

import time

import pytest
import torch

from engine.expert_placement import default_placement
from services.experts.balance import (ExpertBalancer, PlacementRecord, load_view, publish, read_record,
                                     rebalance, view_key)
from services.experts.stats import ExpertStatsWriter, read_window, window_key

pytestmark = pytest.mark.integration
E = 8


@pytest.fixture
def client(redis_url):
    import redis

    with redis.Redis.from_url(redis_url, decode_responses=True) as c:
        yield c


def counts(*pairs) -> torch.Tensor:
    out = torch.zeros(E, dtype=torch.int64)
    for e, n in pairs:
        out[e] = n
    return out


def test_two_writers_add_up_in_the_window_and_the_cumulative_hash(client):
    now = time.time()
    a = ExpertStatsWriter(client, "m", interval_s=10, window_s=60, clock=lambda: now)
    b = ExpertStatsWriter(client, "m", interval_s=10, window_s=60, clock=lambda: now)
    a.flush({0: counts((6, 5), (7, 3)), 1: counts((0, 2))})
    b.flush({0: counts((6, 1), (2, 4))})
    a.flush({0: counts((6, 9), (7, 3)), 1: counts((0, 2))})       # cumulative: +4 on expert 6
    assert read_window(client, "cleave:", "m", E, 60, now=now) == {
        0: [0, 0, 4, 0, 0, 0, 10, 3], 1: [2, 0, 0, 0, 0, 0, 0, 0]}
    assert read_window(client, "cleave:", "m", E, 60, now=now, interval_s=10) == \
        read_window(client, "cleave:", "m", E, 60, now=now)                   # computed keys == SCAN
    assert client.hgetall("cleave:experts:m:0") == {"6": "10", "7": "3", "2": "4"}
    assert client.hgetall("cleave:experts:m:1") == {"0": "2"}
    t0 = int(now) // 10 * 10
    ttl = client.ttl(window_key("cleave:", "m", t0))
    assert 0 < ttl <= 70 + 1                                       # expires interval + window after t0


def test_expired_buckets_vanish_and_are_not_read(client):
    now = time.time()
    old = ExpertStatsWriter(client, "m", interval_s=10, window_s=60, clock=lambda: now - 1000)
    old.flush({0: counts((1, 7))})
    assert client.keys(window_key("cleave:", "m", "*")) == []     # EXPIREAT in the past: Redis dropped it
    assert client.hgetall("cleave:experts:m:0") == {"1": "7"}      # the cumulative hash keeps it
    recent = ExpertStatsWriter(client, "m", interval_s=1, window_s=1)
    recent.flush({0: counts((3, 2))})
    assert read_window(client, "cleave:", "m", E, 60) == {0: [0, 0, 0, 2, 0, 0, 0, 0]}
    assert read_window(client, "cleave:", "m", E, 60, now=time.time() + 120) == {}   # left the window
    assert read_window(client, "cleave:", "m", E, 60, interval_s=1) == {0: [0, 0, 0, 2, 0, 0, 0, 0]}
    deadline = time.time() + 10
    while client.keys(window_key("cleave:", "m", "*")) and time.time() < deadline:
        time.sleep(0.2)
    assert client.keys(window_key("cleave:", "m", "*")) == []     # expired by Redis within ~2 s


def _record(version=1, ep=2, redundant=2) -> PlacementRecord:
    p = default_placement(E, ep, redundant)
    return PlacementRecord(version, E, ep, p.slots, {0: p, 1: p}, window_s=60)


def test_publish_is_compare_and_set(client):
    assert publish(client, "cleave:", "m", _record(1), 0)
    assert not publish(client, "cleave:", "m", _record(1), 0)          # someone already wrote v1
    assert publish(client, "cleave:", "m", _record(2), 1)
    assert not publish(client, "cleave:", "m", _record(2), 1)
    assert read_record(client, "cleave:", "m").version == 2


def _skew(client, model="m"):
    """Window loads: experts 6 and 7 hot in layers 0 and 1 (both on EP rank 1 by default)."""
    w = ExpertStatsWriter(client, model, interval_s=10, window_s=60)
    w.flush({layer: counts((6, 500), (7, 300), (0, 50), (3, 50)) for layer in (0, 1)})


def test_balancer_starts_follows_and_rebalances_past_the_threshold(client):
    applied = []

    def apply(layers):
        applied.append(layers)
        return {"moved": 1, "bytes": 10}

    clock = [1000.0]
    bal = ExpertBalancer(client, "cleave:", "m", E, [0, 1], 2, 2, apply, window_s=60, rebalance_interval_s=5,
                         rebalance_threshold=0.1, clock=lambda: clock[0], interval_s=10)
    bal.start()
    assert bal.version == 1 and applied[-1][0] == default_placement(E, 2, 2)
    assert read_record(client, "cleave:", "m").reason == "default"
    bal.tick()                                  # no load, not yet time: nothing changes
    assert bal.version == 1 and len(applied) == 1
    _skew(client)
    bal.tick()
    assert bal.version == 1 and bal.hotspots[0] > 1.5                     # the view shows the hotspot
    assert float(client.hget(view_key("cleave:", "m"), "0")) == pytest.approx(bal.hotspots[0], abs=1e-3)
    clock[0] += 6
    bal.tick()                                  # periodic: publishes v2 and switches to it
    rec = read_record(client, "cleave:", "m")
    assert rec.version == 2 and rec.reason == "periodic" and bal.version == 2
    assert rec.hotspot_after < rec.hotspot_before * 0.9 and applied[-1] == rec.layers
    assert bal.hotspots[0] < 1.1
    clock[0] += 6
    bal.tick()                                  # already balanced: no new version
    assert read_record(client, "cleave:", "m").version == 2 and len(applied) == 2

    # a second instance of the pool starts from the recorded placement
    other = []
    late = ExpertBalancer(client, "cleave:", "m", E, [0, 1], 2, 2, lambda layers: other.append(layers) or {},
                          window_s=60)
    late.start()
    assert late.version == 2 and other[-1] == rec.layers
    # an instance of another shape keeps its own default and does not follow
    odd = ExpertBalancer(client, "cleave:", "m", E, [0, 1], 2, 0, lambda layers: {}, window_s=60)
    odd.start()
    assert not odd.follow and odd.current[0] == default_placement(E, 2, 0)


def test_rebalance_on_demand_and_load_view(client):
    with pytest.raises(ValueError, match="no expert placement recorded"):
        rebalance(client, "cleave:", "m")
    publish(client, "cleave:", "m", _record(1), 0)
    _skew(client)
    view = load_view(client, "cleave:", "m")
    assert view["version"] == 1 and view["layers"][0]["experts"][6] == 500
    # default EP2 + 2 redundant: rank 1 holds 5, 6, 7 and copies of 0, 1 -> 825 of 900 tokens
    assert view["layers"][0]["ranks"] == [75.0, 825.0]
    assert view["layers"][0]["hotspot"] == pytest.approx(825 / 450)
    dry = rebalance(client, "cleave:", "m", dry_run=True)
    assert not dry["published"] and read_record(client, "cleave:", "m").version == 1
    out = rebalance(client, "cleave:", "m", threshold=0.1)
    assert out["published"] and out["version"] == 2 and out["after"] < out["before"]
    assert load_view(client, "cleave:", "m")["layers"][0]["hotspot"] == pytest.approx(out["layers"][0][1])
