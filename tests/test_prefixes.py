"""prepack.executor.regions: which shared prefix regions a run opens (pure planning, no model), and layout.Parts, the
pieces a request's tokens become once they ran in several segments."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from prepack.planner.layout import Parts
from prepack.executor.regions import common_prefix_length, live_match, next_region_end


@st.composite
def requests_with_shared_heads(draw):
    """Requests built from a few heads (so prefixes really repeat) and random tails over a tiny alphabet."""
    heads = draw(st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=12), min_size=1, max_size=3))
    n = draw(st.integers(1, 9))
    out = []
    for _ in range(n):
        head = heads[draw(st.integers(0, len(heads) - 1))]
        tail = draw(st.lists(st.integers(0, 2), min_size=1, max_size=6))
        out.append(np.asarray(head + tail, np.int64))
    return out


@settings(max_examples=60, deadline=None)
@given(requests_with_shared_heads(), st.integers(1, 5), st.data())
def test_a_new_region_is_a_true_common_prefix_worth_its_part(tokens, min_tokens, data):
    prompt, others = tokens[0], tokens[1:]
    matched = data.draw(st.integers(0, len(prompt)))
    end = next_region_end(prompt, matched, others, min_tokens)
    if end == 0:
        return
    sharing = [o for o in others if common_prefix_length(prompt, o) >= end]
    assert sharing  # some waiting prompt shares all of it
    assert end - matched >= min_tokens or end == len(prompt) > matched
    # no other candidate end saves more: (end - matched) * readers is the most of any common prefix length
    for o in others:
        length = common_prefix_length(prompt, o)
        if length - matched >= min_tokens or length == len(prompt) > matched:
            k = sum(common_prefix_length(prompt, x) >= length for x in others)
            assert (length - matched) * k <= (end - matched) * len(sharing)


def test_a_system_prompt_shared_by_chats_is_one_region():
    system = np.arange(100)
    chats = [np.concatenate([system, np.full(k + 1, 500 + k)]) for k in range(5)]
    assert next_region_end(chats[0], 0, chats[1:] + [np.arange(40) + 1000]) == 100


def test_identical_prompts_share_all_of_it_however_short():
    assert next_region_end(np.arange(5), 0, [np.arange(5)]) == 5


def test_longer_prefixes_of_a_subgroup_win_when_they_save_more():
    header = np.arange(40)
    a, b = np.arange(200) + 1000, np.arange(200) + 2000
    tokens = [np.concatenate([header, q, [k]]) for q in (a, b) for k in range(3)]
    # one 40-token header for 5 readers saves 200 < one 240-token question for 2 readers saves 480
    assert next_region_end(tokens[0], 0, tokens[1:]) == 240
    # under the header region, the question is the child
    assert next_region_end(tokens[0], 40, tokens[1:]) == 240


def test_prefixes_shorter_than_min_tokens_are_not_shared():
    prompt, other = (np.concatenate([np.arange(20), [k]]) for k in (98, 99))
    assert next_region_end(prompt, 0, [other], min_tokens=32) == 0


def test_a_request_starts_at_the_deepest_live_region_it_begins_with():
    live = {-1: np.arange(10), -2: np.arange(30), -3: np.arange(5) + 7}
    assert live_match(np.arange(40), live) == -2
    assert live_match(np.arange(20), live) == -1
    assert live_match(np.arange(30), live) == -2  # a whole prompt may be a region
    assert live_match(np.arange(3), live) is None


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
