"""The heartbeat watchdog on an in-process store: a rank that stops beating is named with its step."""
import time

import torch.distributed as dist

from maws_fast.parallel.watchdog import STALL_EXIT, Watchdog


def test_a_rank_that_stops_beating_is_named_within_the_stall_time():
    store = dist.HashStore()
    exits, said = [], []
    healthy = Watchdog(store, 0, 2, stall_s=0.6, interval=0.05, exit_fn=exits.append, say=said.append)
    wrong = []
    stuck = Watchdog(store, 1, 2, stall_s=0.6, interval=0.05, exit_fn=wrong.append, say=said.append)
    beats = []  # when rank 1 last published: the stall time counts from its last beat, not from stop()
    publish = stuck._publish
    stuck._publish = lambda: (publish(), beats.append(time.monotonic()))
    healthy.start(), stuck.start()
    for step in range(1, 6):
        healthy.progress("mae", step)
        stuck.progress("mae", step)
        time.sleep(0.05)
    stuck.stop()  # rank 1's process stops: no more beats
    t0 = time.monotonic()
    while not exits and time.monotonic() - t0 < 5:
        healthy.progress("mae", 6)  # rank 0 keeps beating (it would be blocked in a collective)
        time.sleep(0.02)
    detect = time.monotonic() - beats[-1]
    assert exits == [STALL_EXIT] and wrong == []
    # never before the stall time since the last beat; at most a check interval or two (and scheduling) after
    assert 0.6 <= detect < 0.6 + 0.4, detect
    assert len(said) == 1 and "rank 1 stopped making progress at step 5 of stage mae" in said[0]
    healthy.stop()


def test_ranks_that_beat_are_never_reported():
    store = dist.HashStore()
    fired = []
    dogs = [Watchdog(store, r, 3, stall_s=0.3, interval=0.03, exit_fn=fired.append) for r in range(3)]
    for d in dogs:
        d.start()
    time.sleep(1.0)  # no step for 1 s, three times the stall time: the beats alone keep them alive
    for d in dogs:
        d.stop()
    assert fired == [] and all(d._beat > 10 for d in dogs)
