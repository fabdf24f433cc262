"""What Hugging Face users pass in: tokenizer output, strings and chats give the same answer as token ids."""

import numpy as np
import pytest
import torch

import prepack
from prepack.hf.model import default_token_budget

from .models import alone_last_logits, build, left_pad, prompts, tokenizer

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a user asks", "packing prompts removes the padding"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tokenizer_output_gives_each_prompts_own_logits(tok, side):
    model = build("llama")
    tok.padding_side = side
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    seqs = [torch.tensor(tok(t)["input_ids"]) for t in TEXTS]
    assert enc["attention_mask"].min() == 0  # really padded
    result = prepack.prefill(model, enc)
    assert (result.logits - alone_last_logits(model, seqs)).abs().max() <= 1e-4


def test_a_mapping_of_lists_is_accepted_like_tokenizer_output():
    ids, mask = left_pad(prompts([3, 7, 5]))
    got = prepack.prefill(build("llama"), {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}).logits
    want = prepack.prefill(build("llama"), prompts([3, 7, 5])).logits
    torch.testing.assert_close(got, want)


def test_strings_with_a_tokenizer_equal_their_token_ids(tok):
    model = build("llama")
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    torch.testing.assert_close(prepack.prefill(model, TEXTS, tokenizer=tok).logits, prepack.prefill(model, seqs).logits)


def test_chats_go_through_the_tokenizers_chat_template(tok):
    model = build("llama")
    chats = [[{"role": "user", "content": t}] for t in TEXTS]
    ids = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats]
    torch.testing.assert_close(prepack.prefill(model, chats, tokenizer=tok).logits, prepack.prefill(model, ids).logits)


def test_generate_with_a_tokenizer_gives_each_results_text(tok):
    model = build("llama")
    out = prepack.generate(model, TEXTS, tokenizer=tok, max_new_tokens=3, do_sample=False)
    assert [g.text for g in out] == [tok.decode(g.tokens, skip_special_tokens=True) for g in out]


def test_unpadded_tokenizer_output_gives_each_rows_own_logits(tok):
    model = build("llama")
    enc = tok(TEXTS)  # no padding: rows of their own lengths
    seqs = [torch.tensor(ids) for ids in enc["input_ids"]]
    assert len({len(s) for s in seqs}) > 1  # really ragged
    result = prepack.prefill(model, enc)
    assert result.logits.shape == (len(TEXTS), 128)
    assert (result.logits - alone_last_logits(model, seqs)).abs().max() <= 1e-4


def test_a_ragged_mask_is_applied_to_each_row():
    ids = {"input_ids": [[0, 0, 5, 6], [7, 8, 9], [4, 3, 0]], "attention_mask": [[0, 0, 1, 1], [1, 1, 1], [1, 1, 0]]}
    want = prepack.prefill(build("llama"), [[5, 6], [7, 8, 9], [4, 3]]).logits
    torch.testing.assert_close(prepack.prefill(build("llama"), ids).logits, want)


@pytest.mark.parametrize("batch, message", [
    ({"input_ids": [[5, 6], [7, 8, 9]], "attention_mask": [[1, 1], [1, 0, 1]]}, "request 1's attention_mask has a hole"),
    ({"input_ids": [[5, 6], [7, 8, 9]], "attention_mask": [[1, 1], [1, 1]]},
     "request 1's attention_mask has 2 entries but its input_ids has 3"),
    ({"input_ids": [[5, 6], [7, 8, 9]], "attention_mask": [[1, 1]]}, "attention_mask has 1 rows but input_ids has 2"),
    ({"input_ids": [[5, 6], [[7], [8]]]}, "request 1's input_ids is not a flat sequence of token ids"),
])
def test_malformed_ragged_tokenizer_output_is_refused_naming_the_request(batch, message):
    with pytest.raises(ValueError, match=message):
        prepack.prefill(build("llama"), batch)


@pytest.mark.parametrize("inputs, kwargs, message", [
    (torch.ones(2, 4, dtype=torch.long), {}, "without its attention_mask"),
    ({"input_ids": torch.ones(2, 4, dtype=torch.long)}, {}, "without an attention_mask"),
    ({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1], [0, 2, 1]])}, {},
     "request 1's attention_mask has values other than 0 and 1"),
    ({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 1]])}, {},
     "request 1's attention_mask has a hole"),
    (["hello", "world"], {}, "got strings but no tokenizer"),
    ([[1, 2], "world"], {}, "request 1 is text but other requests are token ids"),
    ("hello", {}, "got a single string"),
])
def test_ambiguous_or_malformed_input_is_refused(inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepack.prefill(build("llama"), inputs, **kwargs)


def test_a_chat_without_a_template_is_refused(tok):
    tok = tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        prepack.prefill(build("llama"), [[{"role": "user", "content": "hello"}]], tokenizer=tok)


def test_a_tokenizer_without_a_pad_token_is_fine_because_prepack_needs_none(tok):
    tok = tokenizer()
    tok.pad_token = None
    model = build("llama")
    seqs = [torch.tensor(tok(t)["input_ids"]) for t in TEXTS]
    result = prepack.prefill(model, TEXTS, tokenizer=tok)
    assert (result.logits - alone_last_logits(model, seqs)).abs().max() <= 1e-4


def test_the_default_token_budget_bounds_each_forward():
    model = build("llama")
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    prepack.prefill(model, prompts([200] * 50))  # 10,000 tokens
    hook.remove()
    assert max(seen) <= default_token_budget(model) and len(seen) > 1


@pytest.mark.parametrize("key", ["pixel_values", "image_grid_thw", "mm_token_type_ids", "token_type_ids"])
def test_a_mapping_key_prepack_does_not_use_is_refused_naming_it(key):
    ids, mask = left_pad(prompts([3, 5]))
    batch = {"input_ids": ids, "attention_mask": mask, key: torch.zeros(2, 5, dtype=torch.long)}
    with pytest.raises(ValueError, match=f"carries '{key}', which prepack does not use"):
        prepack.prefill(build("llama"), batch)
