"""lm-evaluation-harness's own ``hf`` model around a tiny test model: the oracle for prepack's scoring."""

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from .models import VOCAB  # noqa: E402


def word_tokenizer():
    """A tokenizer whose words are the token ids: "w5 w17" <-> [5, 17]; <s> (1) is BOS, </s> (2) EOS, <pad> (0) padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tk = Tokenizer(models.WordLevel(words, unk_token="<s>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def hflm(model, *, max_length: int = 256, batch_size=4, tokenizer=None) -> HFLM:
    """lm-eval's ``hf`` model over an already built model, on CPU (default tokenizer: :func:`word_tokenizer`)."""
    tokenizer = word_tokenizer() if tokenizer is None else tokenizer
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device="cpu")


def encoded_pairs(lm: HFLM, pairs) -> list[tuple[list[int], list[int]]]:
    """The token ids lm-eval's ``loglikelihood`` makes of (context, continuation) strings, before scoring them."""
    seen = []

    def record(requests, disable_tqdm=False):  # stands in for the scoring step: keeps what it was handed
        seen.extend((c, t) for _, c, t in requests)
        return []

    lm._loglikelihood_tokens = record
    lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], disable_tqdm=True)
    return [(list(c), list(t)) for c, t in seen]


def text(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def rolling_instances(documents) -> list:
    return [Instance("loglikelihood_rolling", {}, (text(d),), i) for i, d in enumerate(documents)]
