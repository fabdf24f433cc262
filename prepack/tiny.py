"""A tiny random-weight causal LM and its tokenizer, built offline: what the docs' snippets run on.

Every snippet in README.md and docs/ is written for a real checkpoint (``from_pretrained(name)``) and is
run by the tests on this stand-in instead, saved where the checkpoint name points. Use it the same way to
try prepack without a download::

    path = prepack.tiny.save_tiny_model("tiny-llama")       # a directory from_pretrained reads
    model = AutoModelForCausalLM.from_pretrained(path)

Its text is random (the weights are), but every prepack result on it is checked against the plain model
exactly as on a real one. Like many released checkpoints it has an EOS token and no ``pad_token_id``.
"""

from __future__ import annotations

from pathlib import Path

_TEXT = [
    "the quick brown fox jumps over the lazy dog", "packing prompts removes the padding from the prefill",
    "a user asks a question and the assistant answers it", "hello world how are you today",
    "the capital of france is paris", "sequence packing runs many prompts in one forward",
]
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 256):
    """A BPE tokenizer trained offline on a few sentences: ``[PAD]`` 0, ``[UNK]`` 1, ``[EOS]`` 2, a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()  # decoded text keeps its spaces
    tok.train_from_iterator(_TEXT * 20, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    out.chat_template = _CHAT_TEMPLATE
    return out


def tiny_model_and_tokenizer(*, seed: int = 0):
    """A 2-layer Llama (hidden size 64, 4 heads, 2 KV heads) with seeded random weights, in eval mode, and its tokenizer.

    The model's vocabulary is the tokenizer's; its EOS is the tokenizer's ``[EOS]``; ``pad_token_id`` is unset.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=512, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval(), tok


def save_tiny_model(path: str | Path, *, seed: int = 0) -> str:
    """Save :func:`tiny_model_and_tokenizer` to ``path`` (``save_pretrained`` of both); returns ``path`` as a string."""
    model, tok = tiny_model_and_tokenizer(seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
