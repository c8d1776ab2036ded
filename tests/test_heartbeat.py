"""Progress slots in shared memory, and the hang rule, with a fake clock."""
from __future__ import annotations

import os

from fastlaunch.launcher.hangwatch import find_hung
from fastlaunch.heartbeat import (IN_FIT, JOINING_GROUP, REACHED_GROUP, WAITING, Beat, Heartbeat, create,
                                  read_beats)


def _beat(rank, t, flags, event="Recorder.after_batch", counter=5):
    return Beat(t, counter, 100 + rank, rank, 0, 3, flags, event, slot=rank)


def test_slots_round_trip(tmp_path):
    path = tmp_path / ".progress"
    create(path, 3)
    hb = Heartbeat(path, local_rank=1, rank=5)
    hb.beat("MyCallback.after_batch", 2, 7)
    hb.set_flag(IN_FIT, True)
    beats = read_beats(path)
    assert [b.started for b in beats] == [False, True, False]
    b = beats[1]
    assert (b.rank, b.epoch, b.iter, b.flags, b.event, b.slot) == (5, 2, 7, IN_FIT, "MyCallback.after_batch", 1)
    assert b.where() == "MyCallback.after_batch (epoch 2, batch 7)" and b.who == "rank 5"
    assert beats[0].who == "local rank 0"
    assert b.pid == os.getpid()
    child = os.fork()  # a forked process publishes its own pid (the launcher signals it for its stack)
    if child == 0:
        hb.beat("Child.after_batch")
        os._exit(0)
    os.waitpid(child, 0)
    assert read_beats(path)[1].pid == child and read_beats(path)[1].event == "Child.after_batch"


def test_the_rank_that_stopped_first_is_named():
    beats = [_beat(0, 95.0, IN_FIT | REACHED_GROUP), _beat(1, 80.0, IN_FIT | REACHED_GROUP, "Fault.after_batch")]
    culprit, why = find_hung(beats, now=100.0, timeout=10, group_seen_at=50.0)
    assert culprit.rank == 1 and "no progress for 20 s" in why and "Fault.after_batch" in why
    assert find_hung(beats, now=89.0, timeout=10, group_seen_at=50.0) is None


def test_a_rank_waiting_in_a_collective_is_not_blamed_even_if_its_progress_is_older():
    from fastlaunch.heartbeat import IN_COLLECTIVE

    beats = [_beat(0, 70.0, IN_FIT | REACHED_GROUP | IN_COLLECTIVE, "DDP gradient all-reduce"),
             _beat(1, 75.0, IN_FIT | REACHED_GROUP, "Fault.after_batch")]
    culprit, _ = find_hung(beats, now=100.0, timeout=10, group_seen_at=50.0)
    assert culprit.rank == 1


def test_known_waits_and_time_outside_fits_are_not_hangs():
    waiting = [_beat(0, 0.0, IN_FIT | WAITING), _beat(1, 0.0, IN_FIT | WAITING)]
    assert find_hung(waiting, now=1000.0, timeout=10, group_seen_at=None) is None
    outside_fit = [_beat(0, 0.0, REACHED_GROUP), _beat(1, 0.0, REACHED_GROUP)]
    assert find_hung(outside_fit, now=1000.0, timeout=10, group_seen_at=0.0) is None


def test_a_rank_that_never_joins_the_group_is_named():
    beats = [_beat(0, 10.0, IN_FIT | JOINING_GROUP, "DistributedFit.before_fit"), _beat(1, 5.0, 0, "starting")]
    culprit, why = find_hung(beats, now=30.0, timeout=10, group_seen_at=12.0)
    assert culprit.rank == 1 and "never reached the process group" in why
    assert find_hung(beats, now=20.0, timeout=10, group_seen_at=12.0) is None


def test_the_callback_running_now_is_published_without_a_beat_and_collectives_only_set_flags(tmp_path):
    import time

    from fastlaunch.heartbeat import IN_COLLECTIVE, CallSite

    path = tmp_path / ".progress"
    create(path, 1)
    hb = Heartbeat(path, local_rank=0, rank=0)
    hb.beat("before_batch", 1, 4)
    site = CallSite()
    hb.follow(site, interval=0.01)

    class Fault:
        pass

    site.cb, site.event = Fault(), "after_batch"  # what the dispatch stores at each callback call
    deadline = time.time() + 30
    while read_beats(path)[0].event != "Fault.after_batch" and time.time() < deadline:
        time.sleep(0.01)
    beat = read_beats(path)[0]
    assert beat.where() == "Fault.after_batch" and beat.counter == 1  # named, and no progress claimed
    with hb.in_collective():
        inside = read_beats(path)[0]
    assert inside.flags & IN_COLLECTIVE and inside.counter == 1
    assert not read_beats(path)[0].flags & IN_COLLECTIVE
