"""The stop channel on two real ranks (gloo): a stop asked on one rank is acted on by both, at the same
point, for every kind of stop and at every point of the protocol (stopchannel.py states its invariant)."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

RANK_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from fastai.callback.core import CancelEpochException, CancelFitException, CancelTrainException
    from fastlaunch.rank.comm import Comm
    from fastlaunch.env import DistEnv
    from fastlaunch.rank.stopchannel import KINDS, Interrupted, Preempted, StopChannel, flag_bucket_hook

    rank, store_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    comm = Comm(DistEnv.from_environ({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}))
    seen = []

    def outcome(fn):
        try:
            fn()
            return "none"
        except SystemExit as exc:
            return f"exit {exc.code}"
        except Exception as exc:
            return type(exc).__name__

    # 1. each kind asked by one rank rides on the gradients of a real DDP backward
    for kind, asker in ((CancelTrainException, 1), (CancelEpochException, 0), (CancelFitException, 1), (Preempted, 0),
                        (Interrupted, 1)):
        channel = StopChannel(torch.device("cpu"), comm)
        channel.on_preempt = lambda where: seen.append(("checkpoint at", where))
        model = DistributedDataParallel(nn.Linear(3, 2))
        model.register_comm_hook(channel, flag_bucket_hook)
        results = []
        for step in range(3):
            if step == 1 and rank == asker:
                channel.request(kind)
            model(torch.ones(4, 3)).sum().backward()
            result = outcome(lambda: channel.agree(channel.take_received() or [0.0] * len(KINDS)))
            results.append(result)
            if result != "none":
                break
        seen.append((kind.__name__, "gradients", results) + (("interrupted", channel.interrupted),) * (kind is Interrupted))

    # 2. end of training: piggybacked on the recorder's reduction; a preemption waits for the epoch's end
    channel = StopChannel(torch.device("cpu"), comm)
    channel.on_preempt = lambda where: seen.append(("checkpoint at", where))
    if rank == 1:
        channel.request(Preempted)
    payload = torch.tensor([float(rank + 1)])
    reduced, flags = channel.unpack(comm.all_reduce(channel.piggyback(payload)))
    seen.append(("payload", reduced.tolist()))
    seen.append(("end of training", outcome(lambda: channel.agree(flags.tolist(), allowed=(CancelFitException, CancelEpochException)))))
    seen.append(("kept", channel.pending))
    # 3. end of the epoch: the flags alone
    seen.append(("epoch end", outcome(lambda: channel.agree(channel.exchange(), allowed=(Preempted, CancelFitException), position="epoch_end"))))

    # 4. end of validation: the whole-set metrics gather carries the flags as lists
    channel = StopChannel(torch.device("cpu"), comm)
    if rank == 0:
        channel.request(CancelEpochException)
    gathered = comm.all_gather_object(("predictions", channel.outgoing_list()))
    seen.append(("validation", outcome(lambda: channel.agree(channel.combine([f for _, f in gathered]), allowed=(CancelFitException, CancelEpochException)))))

    # 5. a cancel not allowed at a point is dropped on every rank
    channel = StopChannel(torch.device("cpu"), comm)
    if rank == 1:
        channel.request(CancelTrainException)
    seen.append(("train cancel at epoch end", outcome(lambda: channel.agree(channel.exchange(), allowed=(Preempted, CancelFitException))), channel.pending))
    # 7. several buckets: each one's reduction starts at once and the last waits for them all (the mean of
    #    both ranks' gradients, as DDP's own reduction gives), the flags still riding on the last one
    import copy
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 2))
    model = DistributedDataParallel(copy.deepcopy(plain), bucket_cap_mb=0.004)
    channel = StopChannel(torch.device("cpu"), comm)
    buckets = set()

    def counted(state, bucket):
        buckets.add(bucket.index())
        return flag_bucket_hook(state, bucket)

    model.register_comm_hook(channel, counted)
    inputs = [torch.randn(8, 40, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    results = []
    for step in range(3):
        model.zero_grad()
        if step == 1 and rank == 0:
            channel.request(CancelEpochException)
        model(inputs[rank] * (step + 1)).sum().backward()
        results.append(outcome(lambda: channel.agree(channel.take_received() or [0.0] * len(KINDS))))
        plain.zero_grad()
        for r in range(2):
            plain(inputs[r] * (step + 1)).sum().backward()
        same = all(torch.allclose(p.grad, q.grad / 2, atol=1e-6) for p, q in zip(model.module.parameters(), plain.parameters()))
        results.append(same)
    seen.append(("buckets", len(buckets) > 1, results))
    # 6. the object collectives on gloo, and the works this thread keeps (their last reference is dropped here)
    seen.append(("objects", comm.all_gather_object({"rank": rank, "big": "x" * (1000 * rank)})[1]["rank"],
                 comm.broadcast_object(f"from {rank}", src=1), comm.gather_to_rank_zero(rank)))
    seen.append(("held", len(comm._held), all(work is not None for work, _ in comm._held)))
    dist.destroy_process_group()
    with open(out, "w") as fh:
        json.dump(seen, fh)
    import os
    os._exit(0)  # as fastlaunch's worker leaves: a gloo thread at interpreter teardown can abort the process
''')


def test_every_stop_kind_asked_on_one_rank_stops_both_at_the_same_point(tmp_path):
    import subprocess

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"), str(tmp_path / f"r{r}.json")])
             for r in range(2)]
    try:
        assert [p.wait(timeout=240) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert r0[:-2] == r1[:-2]  # the same outcome at the same point on both ranks, whichever asked
    assert r0[:7] == [
        ["CancelTrainException", "gradients", ["none", "CancelTrainException"]],
        ["CancelEpochException", "gradients", ["none", "CancelEpochException"]],
        ["CancelFitException", "gradients", ["none", "CancelFitException"]],
        ["checkpoint at", "batch"],
        ["Preempted", "gradients", ["none", "exit 75"]],
        # the notebook's interrupt: fastai's cancel on both ranks, remembered to raise KeyboardInterrupt after the fit
        ["Interrupted", "gradients", ["none", "CancelFitException"], ["interrupted", True]],
        ["payload", [3.0]],  # the payload summed, the flags taken off it
    ]
    assert r0[7:-2] == [["end of training", "none"], ["kept", [1, 0, 0, 0, 0, 0, 0]], ["checkpoint at", "epoch_end"],
                        ["epoch end", "exit 75"], ["validation", "CancelEpochException"],
                        ["train cancel at epoch end", "none", [0, 0, 0, 0, 0, 0, 0]],
                        ["buckets", True, ["none", True, "CancelEpochException", True, "none", True]]]
    assert r0[-2] == ["objects", 1, "from 1", [0, 1]] and r1[-2] == ["objects", 1, "from 1", None]
    assert r0[-1] == ["held", 4, True]


@pytest.mark.parametrize("asked", [0, 1, 2, 3, 4, 0, 0])
def test_the_flag_layout_is_the_payload_then_one_flag_per_kind(asked):
    import torch

    from fastlaunch.rank.stopchannel import KINDS, StopChannel

    channel = StopChannel(torch.device("cpu"))
    channel.request(KINDS[asked])
    packed = channel.piggyback(torch.tensor([5.0, 6.0]))
    payload, flags = channel.unpack(packed)
    assert payload.tolist() == [5.0, 6.0] and flags.tolist() == [float(i == asked) for i in range(len(KINDS))]
    assert channel.combine([channel.outgoing_list(), channel.outgoing_list()])[asked] == 2.0
