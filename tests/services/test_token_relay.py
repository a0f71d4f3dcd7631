"""services.token_relay: tokens emitted on another thread reach their queues in order, and a
burst of emits costs one event-loop wake-up, not one per token."""
import asyncio
import threading

from services.token_relay import TokenRelay


def test_a_burst_from_another_thread_arrives_in_order_with_few_wakeups():
    async def main():
        loop = asyncio.get_running_loop()
        relay = TokenRelay(loop)
        queues = [asyncio.Queue() for _ in range(8)]
        emits = [relay.emitter(q.put_nowait) for q in queues]
        wakeups = 0
        drain = relay._drain

        def counted():
            nonlocal wakeups
            wakeups += 1
            drain()
        relay._drain = counted

        def step_thread():
            for step in range(50):                   # 50 steps of 8 sequences, as a scheduler emits them
                for i, emit in enumerate(emits):
                    emit(step * 8 + i, None, None)
            for emit in emits:
                emit(None, "stop", None)
        t = threading.Thread(target=step_thread)
        t.start()
        got = [[] for _ in queues]
        for i, q in enumerate(queues):
            while True:
                tok, reason, _ = await q.get()
                if reason is not None:
                    break
                got[i].append(tok)
        t.join()
        assert got == [[step * 8 + i for step in range(50)] for i in range(8)]
        assert 1 <= wakeups < 50 * 8 + 8 and relay._pending == []
        return wakeups

    asyncio.run(main())


def test_an_emit_after_the_loop_closed_raises_and_leaves_no_drain_pending():
    loop = asyncio.new_event_loop()
    relay = TokenRelay(loop)
    loop.close()
    q = asyncio.Queue()
    try:
        relay.put(q.put_nowait, (1, None, None))
    except RuntimeError:
        pass
    else:
        raise AssertionError("a closed loop must refuse the emit")
    assert relay._scheduled is False


def test_emits_made_before_the_loop_runs_cost_exactly_one_wakeup():
    async def main():
        relay = TokenRelay(asyncio.get_running_loop())
        queues = [asyncio.Queue() for _ in range(16)]
        drains = []
        drain = relay._drain
        relay._drain = lambda: (drains.append(1), drain())
        t = threading.Thread(target=lambda: [relay.put(q.put_nowait, (i, None, None)) for i, q in enumerate(queues)])
        t.start()
        t.join()                       # the loop has not run since: one drain is queued, for all 16
        assert [(await q.get())[0] for q in queues] == list(range(16))
        assert len(drains) == 1
    asyncio.run(main())
