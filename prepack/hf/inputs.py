"""What callers pass in -> one list of 1-D token arrays, in input order.

Every entry point (``prefill``, ``generate``, and the ones built on them) takes
what a transformers user already has in hand:

* a list of token-id lists, 1-D tensors or 1-D arrays;
* a ``BatchEncoding`` or any mapping with ``input_ids`` and ``attention_mask``
  (N, L), left- or right-padded: each row keeps exactly its masked tokens; or
  unpadded tokenizer output, rows of their own lengths (each row is a request);
* a list of strings, with ``tokenizer=``;
* a list of chat conversations (lists of ``{"role", "content"}`` dicts), with
  ``tokenizer=`` and the tokenizer's chat template (a generation prompt is added);
* for a vision-language model (:mod:`prepack.hf.vision`): a processor's output (``pixel_values``,
  ``image_grid_thw``, ``mm_token_type_ids`` besides the token ids), or chats with image entries
  and ``processor=`` (each chat goes through ``processor.apply_chat_template`` on its own).

Anything ambiguous is refused rather than guessed: a 2-D tensor without its
mask (its pad tokens would count as prompt tokens), a mask with holes or values
other than 0/1, strings without a tokenizer, a chat without a template.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from .registration import model_device
from ..data.batch import token_array
from .support import check_model
from .vision import VisionPrompts, is_vision_model, join, model_inputs, split_requests, vision_family


class Prompts(NamedTuple):
    """Normalised prompts.

    Attributes:
        tokens: N 1-D int64 arrays, in input order.
        is_text: True when strings or chats came in (so text can be returned).
        vision: each request's images and positions (:class:`prepack.hf.vision.VisionPrompts`) when
            the inputs carry images for a vision-language model, else None.
    """

    tokens: list[np.ndarray]
    is_text: bool
    vision: "VisionPrompts | None" = None


def as_prompts(inputs, tokenizer=None, *, processor=None, model=None) -> Prompts:
    """Normalise any supported input into token arrays; errors name the request and the fix.

    ``model`` is needed for inputs with images (it says which keys its family takes, and gives the
    positions); ``processor`` turns chats with images into model inputs.
    """
    if isinstance(inputs, Mapping) or _is_batch_encoding(inputs):
        if model is not None and _vision_keys(inputs) and _is_vision(model):
            if _text_only(inputs):  # a processor's output without images: its token types say "text" everywhere
                return Prompts(_from_padded(inputs, used=_TOKEN_TYPE_KEYS), False)
            return with_images(model, inputs)
        return Prompts(_from_padded(inputs), False)
    if isinstance(inputs, (torch.Tensor, np.ndarray)) and inputs.ndim == 2:
        raise ValueError(
            f"got a 2-D input_ids tensor of shape {tuple(inputs.shape)} without its attention_mask, so padding "
            "cannot be told from prompt tokens; pass the tokenizer output (input_ids and attention_mask together), "
            "or a list of 1-D prompts"
        )
    if isinstance(inputs, str):
        raise ValueError("got a single string; wrap it in a list of prompts: [text]")
    if isinstance(inputs, (torch.Tensor, np.ndarray)) and inputs.ndim == 1:
        raise ValueError(f"got one 1-D tensor of {len(inputs)} token ids; wrap it in a list of prompts: [ids]")
    if not isinstance(inputs, (Sequence, torch.Tensor, np.ndarray)) or isinstance(inputs, bytes):
        raise ValueError(f"prompts must be a list, a tensor or tokenizer output, got {type(inputs).__name__}")
    items = list(inputs)
    if is_chat(items):
        raise ValueError(f"got a single chat of {len(items)} messages; wrap it in a list of prompts: [chat]")
    if items and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
        raise ValueError(f"got a single list of {len(items)} token ids; wrap it in a list of prompts: [ids]")
    if items and all(isinstance(x, str) for x in items):
        return Prompts(_tokenize(items, _need_tokenizer(tokenizer, "strings")), True)
    if items and all(is_chat(x) for x in items):
        if processor is not None:
            return _chats_with_processor(model, items, processor)
        for i, chat in enumerate(items):
            if _has_image(chat):
                raise ValueError(f"request {i} is a chat with an image entry; pass processor= (the model's processor) to turn it into model inputs")
        return Prompts(_apply_chat_template(items, _need_tokenizer(tokenizer, "chat conversations")), True)
    if processor is not None:
        raise ValueError("processor= applies to chat conversations; pass the processor's output itself for other prompts")
    for i, x in enumerate(items):
        if isinstance(x, str) or is_chat(x):
            raise ValueError(f"request {i} is text but other requests are token ids; pass one kind of prompt")
    return Prompts([token_array(x, i) for i, x in enumerate(items)], False)


def is_prompt_batch(inputs) -> bool:
    """Whether :func:`as_prompts` takes ``inputs`` whole (a list, a tensor, tokenizer output; or refuses it
    whole), rather than it being an iterable of prompts to read a few at a time (a generator, a dataset column)."""
    if isinstance(inputs, (Mapping, Sequence, torch.Tensor, np.ndarray)) or _is_batch_encoding(inputs):
        return True
    return not isinstance(inputs, Iterable)


def _is_batch_encoding(x) -> bool:
    return hasattr(x, "data") and hasattr(x, "keys") and "input_ids" in x.keys()


def is_chat(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0 and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in x
    )


def _need_tokenizer(tokenizer, what: str):
    if tokenizer is None:
        raise ValueError(f"got {what} but no tokenizer; pass tokenizer= (e.g. AutoTokenizer.from_pretrained(...))")
    return tokenizer


def _tokenize(texts: list[str], tokenizer) -> list[np.ndarray]:
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [token_array(t, i) for i, t in enumerate(ids)]


def _apply_chat_template(chats: list, tokenizer) -> list[np.ndarray]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"got chat conversations but {type(tokenizer).__name__} has no chat_template; set tokenizer.chat_template "
            "or pass strings / token ids"
        )
    out = []
    for i, chat in enumerate(chats):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, Mapping) or _is_batch_encoding(ids):
            ids = ids["input_ids"]
        out.append(token_array(ids, i))
    return out


def _has_image(chat) -> bool:
    return any(
        isinstance(c, Mapping) and c.get("type") in ("image", "video")
        for m in chat if not isinstance(m["content"], str) for c in m["content"]
    )


def _vision_keys(batch) -> list[str]:
    return [k for k in batch.keys() if k not in _PROMPT_KEYS and batch[k] is not None]


def _is_vision(model) -> bool:
    return is_vision_model(model)


# per-token modality rows of processor outputs: 0 marks a text token
_TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")


def _text_only(batch) -> bool:
    """Whether a processor's output carries no image: only token-type rows besides the prompt keys, 0 on every real token."""
    keys = _vision_keys(batch)
    if not keys or any(k not in _TOKEN_TYPE_KEYS for k in keys):
        return False
    mask = batch["attention_mask"] if "attention_mask" in batch.keys() else None
    rows = [r for k in keys for r in _from_padded({"input_ids": batch[k], "attention_mask": mask})]
    return all(not r.any() for r in rows)


def with_images(model, batch) -> Prompts:
    """A vision-language model's processor output -> each request's tokens, images and positions."""
    family = vision_family(model, _vision_keys(batch))
    tokens = _from_padded(batch, used=model_inputs(family))
    mask = batch["attention_mask"] if "attention_mask" in batch.keys() else None
    token_rows = {
        k: _from_padded({"input_ids": batch[k], "attention_mask": mask}) for k in family.token_keys
        if k in batch.keys() and batch[k] is not None
    }
    images = {k: batch[k] for k in family.image_keys if k in batch.keys()}
    return Prompts(tokens, False, split_requests(model, family, tokens, images, token_rows))


def _chats_with_processor(model, chats: list, processor) -> Prompts:
    """Each chat through ``processor.apply_chat_template`` on its own (the inputs the model gets for it alone)."""
    if model is None:
        raise ValueError("chats with processor= need the model to lay out their images")
    parts = []
    for chat in chats:
        out = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        parts.append(with_images(model, out) if _is_vision(model) else Prompts(_from_padded(out), True))
    tokens = [t for p in parts for t in p.tokens]
    vision = join([p.vision for p in parts]) if parts and parts[0].vision is not None else None
    return Prompts(tokens, True, vision)


def _from_padded(batch, used: Sequence[str] = ()) -> list[np.ndarray]:
    """input_ids + attention_mask -> each row's masked tokens; the mask must be one contiguous run of 1s.

    ``input_ids`` is (N, L), padded (``tokenizer(..., padding=True)``), or N rows of their own
    lengths (a tokenizer without ``padding``): each row is one request, and a mask that comes
    with ragged rows is applied to each row the same way.
    """
    if "input_ids" not in batch:
        raise ValueError(f"a mapping of prompts needs 'input_ids' (and 'attention_mask'); got keys {list(batch.keys())}")
    _refuse_unused_keys(batch, used)
    ids = _as_rows(batch["input_ids"], "input_ids")
    if "attention_mask" not in batch or batch["attention_mask"] is None:
        if isinstance(ids, np.ndarray) and ids.shape[1] and ids.shape[0] > 1:
            raise ValueError(
                f"input_ids of shape {tuple(ids.shape)} came without an attention_mask, so padding cannot be told "
                "from prompt tokens; pass the attention_mask the tokenizer returned"
            )
        # one row, or rows of different lengths: nothing was padded
        return [token_array(row, i) for i, row in enumerate(ids)]
    mask = _as_rows(batch["attention_mask"], "attention_mask")
    if isinstance(ids, np.ndarray) and isinstance(mask, np.ndarray):
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}")
        _check_mask(mask, 0)
    else:  # ragged rows: the same checks, row by row
        if len(mask) != len(ids):
            raise ValueError(f"attention_mask has {len(mask)} rows but input_ids has {len(ids)}")
        for i, (row, m) in enumerate(zip(ids, mask)):
            if len(m) != len(row):
                raise ValueError(f"request {i}'s attention_mask has {len(m)} entries but its input_ids has {len(row)}")
            _check_mask(m[None], i)
    return [token_array(row[m.astype(bool)], i) for i, (row, m) in enumerate(zip(ids, mask))]


# What a mapping of prompts may carry besides the token ids themselves; anything else is refused, never dropped.
_PROMPT_KEYS = ("input_ids", "attention_mask")


def _refuse_unused_keys(batch, used: Sequence[str]) -> None:
    """Refuse a key of ``batch`` that prepack would not use (pixel values, token type ids, ...): dropping it
    would give each request a result computed without it. ``used``: keys the caller consumes besides the prompt keys."""
    unused = [k for k in batch.keys() if k not in _PROMPT_KEYS and k not in used and batch[k] is not None]
    if unused:
        raise ValueError(
            f"the prompts' mapping carries {', '.join(map(repr, unused))}, which prepack does not use here; a result "
            "computed without it would not be the model's own for that input. Pass only input_ids and attention_mask "
            "(for images, pass the processor output of a vision-language model prepack supports, see docs/vision.md)"
        )


def _check_mask(mask: np.ndarray, first: int) -> None:
    """(n, L) 0/1 mask rows of requests ``first``, ``first + 1``, ...: each must be one contiguous run of 1s."""
    bad = np.flatnonzero(((mask != 0) & (mask != 1)).any(1))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"request {first + i}'s attention_mask has values other than 0 and 1: {sorted(set(mask[i].tolist()))}"
        )
    # a padded row is one run of 1s: at most one 0->1 and one 1->0 step, counting the row's edges
    edges = np.abs(np.diff(np.pad(mask, ((0, 0), (1, 1))), axis=1)).sum(1)
    holes = np.flatnonzero(edges > 2)
    if len(holes):
        raise ValueError(
            f"request {first + int(holes[0])}'s attention_mask has a hole (0s between 1s); prepack takes left- or "
            "right-padded rows, whose real tokens are contiguous"
        )


def _as_rows(x, name: str) -> np.ndarray | list[np.ndarray]:
    """An (N, L) batch -> a 2-D array; N rows of different lengths (a list) -> N 1-D arrays."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)) and not all(isinstance(r, str) for r in x):
        rows = [np.asarray(r.detach().cpu() if isinstance(r, torch.Tensor) else r) for r in x]
        if any(r.ndim != 1 or r.dtype == object for r in rows):
            i = next(i for i, r in enumerate(rows) if r.ndim != 1 or r.dtype == object)
            raise ValueError(f"request {i}'s {name} is not a flat sequence of token ids (shape {rows[i].shape})")
        if len({len(r) for r in rows}) > 1:
            return rows
        x = np.stack(rows) if rows else np.zeros((0, 0), np.int64)
    arr = np.asarray(x)
    if arr.dtype == object or arr.ndim != 2:
        raise ValueError(f"{name} must be an (N, L) batch or N rows of token ids; got shape {arr.shape}")
    return arr


def check_prompts(model, inputs, *, tokenizer=None, processor=None) -> Prompts:
    """Normalise prompts (:func:`prepack.hf.inputs.as_prompts`) and validate them against ``model``.

    Errors name the request and the limit: an empty prompt, one longer than the model's
    ``max_position_embeddings``, a token id outside its vocabulary, a tensor on another device.
    """
    check_model(model)
    device = model_device(model)
    if hasattr(inputs, "keys") and "input_ids" in inputs.keys():
        tensors = [("input_ids", inputs["input_ids"])]
    elif isinstance(inputs, (list, tuple)):
        tensors = [(f"request {i}", s) for i, s in enumerate(inputs)]
    else:
        tensors = [("input_ids", inputs)]
    for what, s in tensors:
        if isinstance(s, torch.Tensor) and s.device != device:
            raise ValueError(f"{what} is on {s.device} but the model is on {device}; move it with .to({str(device)!r})")
    prompts = as_prompts(inputs, tokenizer, processor=processor, model=model)
    config = model.config.get_text_config(decoder=True)
    max_pos = getattr(config, "max_position_embeddings", None)
    vocab = getattr(config, "vocab_size", None)
    for i, t in enumerate(prompts.tokens):
        if max_pos is not None and len(t) > max_pos:
            raise ValueError(f"request {i} has {len(t)} tokens but the model's max_position_embeddings is {max_pos}")
        if vocab is not None and t.max() >= vocab:
            raise ValueError(f"request {i} has token id {t.max()} but the model's vocab_size is {vocab}")
    return prompts
