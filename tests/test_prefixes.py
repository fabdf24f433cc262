"""prepack.prefixes: which shared prefixes a call runs once (pure planning, no model), and layout.Parts, the
pieces a request's tokens become once they ran in several segments."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from prepack.layout import Parts
from prepack.prefixes import common_prefix_length, plan_prefixes


@st.composite
def requests_with_shared_heads(draw):
    """Requests built from a few heads (so prefixes really repeat) and random tails over a tiny alphabet."""
    heads = draw(st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=12), min_size=1, max_size=3))
    n = draw(st.integers(0, 9))
    out = []
    for _ in range(n):
        head = heads[draw(st.integers(0, len(heads) - 1))]
        tail = draw(st.lists(st.integers(0, 2), min_size=0, max_size=6))
        out.append(np.asarray(head + tail, np.int64))
    return out


@settings(max_examples=60, deadline=None)
@given(requests_with_shared_heads(), st.integers(1, 5))
def test_every_shared_prefix_is_a_true_common_prefix_and_leaves_each_request_a_token(tokens, min_tokens):
    plan = plan_prefixes(tokens, min_tokens=min_tokens)
    for i, t in enumerate(tokens):
        j, p = int(plan.prefix_of[i]), int(plan.shared[i])
        if j < 0:
            assert p == 0
            continue
        source = tokens[plan.sources[j]]
        assert p == plan.prefix_lengths[j] >= min_tokens
        assert p <= len(t) - 1  # the last token, whose logits are asked for, is the request's own
        # reconstruction: the prefix run once, then the request's own suffix, is the request
        assert np.array_equal(np.concatenate([source[:p], t[p:]]), t)


@settings(max_examples=60, deadline=None)
@given(requests_with_shared_heads(), st.integers(1, 5))
def test_a_shared_prefix_has_at_least_two_requests_and_saves_what_it_reports(tokens, min_tokens):
    plan = plan_prefixes(tokens, min_tokens=min_tokens)
    members = np.bincount(plan.prefix_of[plan.prefix_of >= 0], minlength=plan.num_prefixes)
    assert (members >= 2).all()
    assert plan.tokens_saved == int(((members - 1) * plan.prefix_lengths).sum()) >= 0


@settings(max_examples=40, deadline=None)
@given(requests_with_shared_heads(), st.integers(1, 5))
def test_limits_bound_the_shared_tokens(tokens, min_tokens):
    limits = np.array([len(t) // 2 for t in tokens], np.int64)
    plan = plan_prefixes(tokens, limits=limits, min_tokens=min_tokens)
    assert (plan.shared <= limits).all()


def test_a_system_prompt_shared_by_chats_is_run_once():
    system = np.arange(100)
    chats = [np.concatenate([system, np.full(k + 1, 500 + k)]) for k in range(5)]
    plan = plan_prefixes(chats + [np.arange(40) + 1000])
    assert plan.num_prefixes == 1 and plan.prefix_lengths.tolist() == [100]
    assert plan.prefix_of.tolist() == [0, 0, 0, 0, 0, -1]
    assert plan.tokens_saved == 4 * 100


def test_identical_requests_share_all_but_their_last_token():
    plan = plan_prefixes([np.arange(50), np.arange(50), np.arange(50)])
    assert plan.shared.tolist() == [49, 49, 49]


def test_longer_prefixes_of_subgroups_win_when_they_save_more():
    header = np.arange(40)
    a, b = np.arange(200) + 1000, np.arange(200) + 2000
    tokens = [np.concatenate([header, q, [k]]) for q in (a, b) for k in range(3)]
    plan = plan_prefixes(tokens)  # one 40-token header (saves 200) < two 240-token questions (save 960)
    assert sorted(plan.prefix_lengths.tolist()) == [240, 240]


def test_prefixes_shorter_than_min_tokens_are_not_shared():
    plan = plan_prefixes([np.arange(20), np.arange(20)], min_tokens=32)
    assert plan.num_prefixes == 0 and plan.tokens_saved == 0


def test_common_prefix_length_counts_leading_equal_tokens():
    assert common_prefix_length(np.array([1, 2, 3]), np.array([1, 2, 4, 5])) == 2
    assert common_prefix_length(np.array([1, 2]), np.array([1, 2, 3])) == 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 50), st.integers(0, 6)), max_size=12),
       st.lists(st.integers(0, 3), max_size=6))
def test_parts_keep_each_requests_pieces_in_token_order_and_select_them_by_request(pieces, rows):
    parts = Parts.join(pieces, 4)
    kept = [p for p in pieces if p[3] > 0]
    assert parts.lengths.tolist() == [sum(p[3] for p in kept if p[0] == i) for i in range(4)]
    chosen = parts.select(rows)
    want = [(k, c, s, m) for k, r in enumerate(rows) for (i, c, s, m) in kept if i == r]
    got = list(zip(chosen.owner.tolist(), chosen.chunk.tolist(), chosen.starts.tolist(), chosen.sizes.tolist()))
    assert got == want
    # request k's tokens land back to back from first[k], piece after piece
    first = np.cumsum([0] + chosen.lengths.tolist())[:-1] * 10
    assert chosen.targets(first).tolist() == [int(first[k]) + j for k in range(len(rows)) for j in range(int(chosen.lengths[k]))]
