"""prepack.data.sampler / prepack.planner.balance: packed rows across data-parallel ranks x micro-steps.

Real process groups (gloo, CPU) check that ranks get equal batch counts and together use every row once.
"""

import socket

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from prepack import PackedRowSampler, plan
from prepack.planner.balance import attention_coefficient, balance_rows, row_costs
from prepack.bench.prompts import sample_lengths


def rows_of(lengths, capacity=64):
    p = plan(np.asarray(lengths), capacity)
    seq = np.asarray(lengths)[p.order]
    bounds = np.cumsum(np.concatenate([[0], p.row_counts]))
    return [{"seq_lengths": seq[a:b].tolist()} for a, b in zip(bounds[:-1], bounds[1:])]


def every_rank(rows, world, **kwargs):
    return [list(PackedRowSampler(rows, world_size=world, rank=r, **kwargs)) for r in range(world)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=24, max_size=200), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 5))
def test_ranks_get_equal_micro_batch_counts_and_use_every_row_once(lengths, world, micro, per_batch, epoch):
    rows = rows_of(lengths)
    if len(rows) < world * micro:
        with pytest.raises(ValueError, match=f"cannot give each of {world} ranks x {micro} micro-steps"):
            PackedRowSampler(rows, world_size=world, rank=0, micro_steps=micro)
        return
    samplers = [PackedRowSampler(rows, world_size=world, rank=r, micro_steps=micro, rows_per_micro_batch=per_batch)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    batches = [list(s) for s in samplers]
    assert {len(b) for b in batches} == {len(samplers[0])}
    assert len(samplers[0]) % micro == 0
    assert all(len(mb) >= 1 for b in batches for mb in b)
    assert sorted(i for b in batches for mb in b for i in mb) == list(range(len(rows)))


def test_the_order_is_fixed_by_seed_and_epoch():
    rows = rows_of(np.random.default_rng(0).integers(1, 64, 300))
    first = every_rank(rows, 2, micro_steps=2, seed=7)
    assert every_rank(rows, 2, micro_steps=2, seed=7) == first
    assert every_rank(rows, 2, micro_steps=2, seed=8) != first
    again = PackedRowSampler(rows, world_size=2, rank=0, micro_steps=2, seed=7)
    again.set_epoch(1)
    assert list(again) != first[0]


@pytest.mark.parametrize("attention", [None, attention_coefficient(256)])
def test_per_step_cost_is_balanced_across_ranks_on_sharegpt_lengths(attention):
    lengths = sample_lengths(40_000, max_len=2048, seed=0)
    p = plan(lengths, 2048)
    costs = row_costs(lengths[p.order], p.row_counts, attention)
    s = balance_rows(costs, 8, 4, 2, seed=0)
    per = np.zeros((s.steps, 8))
    np.add.at(per, (s.step, s.rank), costs)
    # the epoch waits for the slowest rank of each step: that sum over the ideal
    assert per.max(1).sum() / per.mean(1).sum() <= (1.05 if attention is None else 1.10)


def test_a_resumed_sampler_yields_the_rest_of_the_epoch():
    rows = rows_of(np.random.default_rng(1).integers(1, 64, 300))
    whole = list(PackedRowSampler(rows, world_size=2, rank=1, micro_steps=2, seed=3))
    s = PackedRowSampler(rows, world_size=2, rank=1, micro_steps=2, seed=3)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    resumed = PackedRowSampler(rows, world_size=2, rank=1, micro_steps=2, seed=3)
    resumed.load_state_dict(state)
    assert head + list(resumed) == whole
    with pytest.raises(ValueError, match="the sampler state has rank=1 but this sampler has rank=0"):
        PackedRowSampler(rows, world_size=2, rank=0, micro_steps=2, seed=3).load_state_dict(state)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, rows, out):
    import datetime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        pair = dist.new_group([0, 1])  # every rank makes it; ranks 0 and 1 also train as a world of 2
        runs = {}
        for size, group in ((world, None), (2, pair)):
            if rank >= size:
                continue
            sampler = PackedRowSampler(rows, world_size=dist.get_world_size(group), rank=dist.get_rank(group),
                                       micro_steps=2, rows_per_micro_batch=2, seed=5)
            sampler.set_epoch(1)
            mine = list(sampler)
            for _ in mine:  # one collective per micro-batch: a rank with fewer batches would hang here
                dist.barrier(group=group)
            gathered = [None] * size
            dist.all_gather_object(gathered, mine, group=group)
            runs[size] = gathered
        if rank == 0:
            out.put(runs)
    finally:
        dist.destroy_process_group()


def test_real_gloo_ranks_of_worlds_of_2_and_4_get_equal_counts_and_together_every_row_once():
    rows = rows_of(np.random.default_rng(2).integers(1, 64, 400))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 4, port, rows, out)) for r in range(4)]
    for p in procs:
        p.start()
    runs = out.get(timeout=180)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for world, gathered in runs.items():
        assert len({len(b) for b in gathered}) == 1
        assert sorted(i for b in gathered for mb in b for i in mb) == list(range(len(rows)))
        # each rank computed the schedule any process computes for it: no communication needed
        alone = [PackedRowSampler(rows, world_size=world, rank=r, micro_steps=2, rows_per_micro_batch=2, seed=5)
                 for r in range(world)]
        for s in alone:
            s.set_epoch(1)
        assert gathered == [list(s) for s in alone]
    assert sorted(runs) == [2, 4]
