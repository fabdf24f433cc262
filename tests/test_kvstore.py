"""The decode engine's KV store keeps every request's keys intact through growth, relocation and compaction."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prepack.executor.kvstore import KVStore


def row(request: int, position: int) -> float:
    return request * 1000.0 + position


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from([(1.125, 0), (1.5, 2), (1.01, 16)]))
def test_each_request_reads_back_exactly_its_own_keys_after_any_steps(data, growth_slack):
    """Random steps (new requests, prompt chunks, one-token decodes, frees) on a store made to relocate and
    compact often: after every step each live region holds its request's keys in order, and every key the
    step's layout hands a request is its own."""
    growth, slack = growth_slack
    store = KVStore("cpu", growth=growth, slack=slack)
    written: dict[int, int] = {}  # request -> keys written
    next_id = 0
    for _ in range(data.draw(st.integers(1, 25))):
        live = sorted(written)
        fed = data.draw(st.lists(st.sampled_from(live), unique=True)) if live else []
        new = {r: data.draw(st.integers(1, 3)) for r in fed}
        for _ in range(data.draw(st.integers(0 if new else 1, 2))):
            new[next_id] = data.draw(st.integers(1, 40))
            next_id += 1
        kv = store.plan(new)
        stream = torch.tensor([row(r, written.get(r, 0) + i) for r, n in zip(kv.order, kv.q.tolist(), strict=True) for i in range(n)])
        key = stream.view(1, 1, -1, 1).expand(1, 2, -1, 3)  # (1, H_kv, T, D): every element names its key
        keys, values = kv.extend(0, key, -key)
        for r in new:
            written[r] = written.get(r, 0) + new[r]
        # the layout: the segments that have queries read, in order, exactly their request's keys
        cu_q, cu_k = kv.layout.cu_seqlens_q.tolist(), kv.layout.cu_seqlens_k.tolist()
        with_queries = [(ks, ke) for qs, qe, ks, ke in zip(cu_q, cu_q[1:], cu_k, cu_k[1:], strict=False) if qe > qs]
        assert len(with_queries) == len(kv.order)
        for r, (ks, ke) in zip(kv.order, with_queries, strict=True):
            want = torch.tensor([row(r, p) for p in range(written[r])])
            assert torch.equal(keys[0, 1, ks:ke, 2], want) and torch.equal(values[0, 0, ks:ke, 0], -want)
        # the pool: every live region, fed this step or not
        pool_k, pool_v = store.pools[0]
        for r, n in written.items():
            want = torch.tensor([row(r, p) for p in range(n)])
            got = pool_k[store.start[r]:store.start[r] + n, 0, 0]
            assert store.length[r] == n and torch.equal(got, want) and torch.equal(pool_v[store.start[r]:store.start[r] + n, 1, 1], -want)
        for r in data.draw(st.lists(st.sampled_from(sorted(written)), unique=True, max_size=2)):
            store.free(r)
            del written[r]
    assert store.live_tokens() == sum(written.values())
