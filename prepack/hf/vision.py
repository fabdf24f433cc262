"""Prompts with images: each request's own image inputs and positions, carried through the packed forward.

A vision-language prompt is token ids whose image placeholder tokens (one run per image, expanded by
the processor) are replaced, inside the model's forward, by the vision tower's features of that
image. prepack keeps the model's own way of doing both halves:

* **The vision tower** runs once per forward over every image of the requests in it, concatenated
  in stream order (``model.get_image_features``, which packs the images itself: Qwen-VL's
  ``cu_seqlens`` over patches, a CLIP batch for LLaVA). It runs as a plain call, outside the
  packed layout, and its output goes to the model's forward as ``mm_encoder_outputs``, so the
  model scatters the features at its own placeholder mask (and Qwen3-VL adds its deepstack
  features at the same places).
* **Positions.** A plain-position VLM (LLaVA) gets restarting 1-D positions like any text model.
  An mRoPE model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) gets 3 rows (temporal, height, width) per token:
  each request's rows come from the model's own ``get_rope_index`` run on that request alone, so
  they restart per request and place its image grids as alone; a decode step's position is its
  text position plus the request's ``rope_delta``, as ``model.generate`` does.

What prepack cannot express is refused by name (:func:`vision_family`): Gemma 3's image tokens
attend bidirectionally within their image, video inputs are not implemented, and any other
image-text-to-text family is refused until it is checked against the model alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .support import UnsupportedModelError
from .wrapped import unwrap


@dataclass(frozen=True)
class Family:
    """How one family of vision-language models takes images.

    Attributes:
        image_keys: processor keys holding per-image tensors, concatenated over the images of a forward.
        token_keys: processor keys of per-token rows (like ``input_ids``) that prepack reads and the
            model's forward does not need once positions are given.
        mrope: position ids are 3 rows from the model's ``get_rope_index``; ``pixel_values`` then holds
            ``prod(image_grid_thw)`` patch rows per image (else one row per image).
    """

    image_keys: tuple[str, ...]
    token_keys: tuple[str, ...]
    mrope: bool

    def rows_per_image(self, images: Mapping[str, torch.Tensor], merge: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per image: its placeholder tokens, and per image key how many leading rows it holds."""
        if self.mrope:
            grid = images["image_grid_thw"].cpu().numpy().astype(np.int64)
            patches = grid.prod(-1)
            return patches // merge**2, {"pixel_values": patches, "image_grid_thw": np.ones(len(grid), np.int64)}
        n = len(images["pixel_values"])
        return np.full(n, -1, np.int64), {"pixel_values": np.ones(n, np.int64)}


_QWEN = Family(("pixel_values", "image_grid_thw"), ("mm_token_type_ids",), mrope=True)
FAMILIES = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "llava": Family(("pixel_values",), ("mm_token_type_ids",), mrope=False),
}
# families whose image attention prepack's causal segments cannot express, and why
_REFUSED = {
    "gemma3": "its image tokens attend bidirectionally within their image (token_type_ids), and prepack's packed "
    "attention is causal within each request",
}
_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def vision_family(model, keys=()) -> Family:
    """The :class:`Family` of ``model`` for prompts with images; refuses what prepack cannot run exactly.

    Args:
        keys: the input keys that came with the prompts, to name in the refusal.
    """
    config = unwrap(model).config
    model_type = getattr(config, "model_type", None)
    name = type(unwrap(model)).__name__
    video = [k for k in keys if k in _VIDEO_KEYS]
    if video:
        raise UnsupportedModelError(
            f"{name}: video inputs ({', '.join(video)}) are not implemented by prepack; pass images, or run videos "
            "through the model alone"
        )
    if model_type in _REFUSED:
        raise UnsupportedModelError(f"{name} cannot take prompts with images in a packed call: {_REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{name} ({model_type}) is not a vision-language model prepack has checked with images against the model "
            f"alone (supported: {', '.join(sorted(FAMILIES))}); got image inputs {list(keys)}"
        )
    return FAMILIES[model_type]


@dataclass(frozen=True, eq=False)
class VisionPrompts:
    """The images of N requests and what their positions need, in request order.

    Attributes:
        family: how the model takes images.
        images: per request, a dict of its own image tensors (``family.image_keys``; empty without images).
        positions: per request, (3, L_i) int64 mRoPE position ids (None for a plain-position family).
        deltas: (N,) int64, each request's ``rope_delta``: a decode step's position is its text
            position plus this (zeros for a plain-position family).
        lengths: (N,) int64, each request's prompt tokens.
    """

    family: Family
    images: list[dict]
    positions: list[torch.Tensor] | None
    deltas: np.ndarray
    lengths: np.ndarray

    def take(self, rows: np.ndarray) -> "VisionPrompts":
        """The requests ``rows`` (an index array), in that order."""
        pos = None if self.positions is None else [self.positions[i] for i in rows]
        return VisionPrompts(self.family, [self.images[i] for i in rows], pos, self.deltas[rows], self.lengths[rows])

    def has_images(self, i: int) -> bool:
        return bool(self.images[i])

    def prompt_length(self, i: int) -> int:
        return int(self.lengths[i])

    def encoder_outputs(self, model, order: np.ndarray) -> dict | None:
        """The vision tower once over the images of requests ``order`` (in that order): ``mm_encoder_outputs``.

        A plain call (no packed layout): the tower's attention is the model's own implementation.
        Returns None when none of them has an image.
        """
        with_images = [self.images[i] for i in order if self.images[i]]
        if not with_images:
            return None
        device = next(unwrap(model).parameters()).device
        cat = {k: torch.cat([im[k] for im in with_images]).to(device) for k in self.family.image_keys}
        return {"image": unwrap(model).get_image_features(**cat, return_dict=True)}

    def forward_inputs(self, model, order: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, text_pos: torch.Tensor):
        """What a varlen forward over segments of requests ``order`` passes besides its token ids.

        Args:
            order: (n,) the request (index into these prompts) of each segment, in stream order.
            lengths: (n,) int64 tokens of each segment. offsets: (n,) int64 the text position of each
                segment's first token: 0 for a whole prompt (its images and mRoPE rows); a later one is a
                decode step (text position + ``rope_delta``) or a text-only piece of a prompt (its own rows).
            text_pos: (1, T) int64, the stream's text positions (restarting per segment).

        Returns:
            ``(position_ids, kwargs)``: (1, T) for a plain-position family or (3, 1, T) for mRoPE, and
            ``{"mm_encoder_outputs": ...}`` when a whole prompt with images is in the stream.
        """
        order, lengths, offsets = (np.asarray(a, np.int64) for a in (order, lengths, offsets))
        for i, n, off in zip(order.tolist(), lengths.tolist(), offsets.tolist()):
            # a prompt with images runs whole in one segment: its features are scattered by the model in one go
            if self.images[i] and (off > 0 and off < self.prompt_length(i) or off == 0 and n < self.prompt_length(i)):
                raise ValueError(
                    f"request {i}'s prompt with images would run in pieces (tokens {off}..{off + n} of "
                    f"{self.prompt_length(i)}); prepack runs a prompt with images whole, in one forward"
                )
        enc = self.encoder_outputs(model, order[offsets == 0])
        kwargs = {} if enc is None else {"mm_encoder_outputs": enc}
        if self.positions is None:
            return text_pos, kwargs
        rows, start = [], 0
        for i, n, off in zip(order.tolist(), lengths.tolist(), offsets.tolist()):
            own = self.positions[i][:, off : off + n].to(text_pos.device)  # the prompt's own mRoPE rows
            if own.shape[1] < n:  # past the prompt: text position + rope_delta on all three rows, as model.generate
                k = own.shape[1]
                own = torch.cat([own, (text_pos[0, start + k : start + n] + int(self.deltas[i])).expand(3, n - k)], 1)
            rows.append(own)
            start += n
        return torch.cat(rows, 1)[:, None], kwargs


def model_inputs(family: Family) -> tuple[str, ...]:
    """The keys of a processor's output prepack reads for ``family`` besides input_ids and attention_mask."""
    return family.image_keys + family.token_keys


def image_token_id(model) -> int:
    config = unwrap(model).config
    for name in ("image_token_id", "image_token_index"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    raise UnsupportedModelError(f"{type(unwrap(model)).__name__} has no image_token_id in its config")


def is_vision_model(model) -> bool:
    """Whether ``model`` has a vision tower (its config has a ``vision_config``)."""
    return getattr(unwrap(model).config, "vision_config", None) is not None


def split_requests(model, family: Family, tokens: list[np.ndarray], images: Mapping, token_rows: Mapping) -> VisionPrompts:
    """A processor's batch -> each request's own images and positions.

    Args:
        tokens: N (L_i,) int64 arrays, each request's tokens (padding removed).
        images: the processor's image tensors (``family.image_keys``): the images of all requests,
            request after request, as the processor lays them out.
        token_rows: per token key (``mm_token_type_ids``), N (L_i,) arrays aligned with ``tokens``.
    """
    image_token = image_token_id(model)
    wanted = [int((t == image_token).sum()) for t in tokens]
    missing = [k for k in family.image_keys if images.get(k) is None]
    if missing:
        if any(wanted):
            i = next(i for i, w in enumerate(wanted) if w)
            raise ValueError(f"request {i} has {wanted[i]} image tokens but the inputs carry no {', '.join(missing)}")
        return _positions(model, family, tokens, [{} for _ in tokens], token_rows)
    config = unwrap(model).config
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", 1) or 1
    per_image, rows = family.rows_per_image(images, merge)
    if not family.mrope:  # a fixed number of placeholder tokens per image
        total = sum(wanted)
        if len(per_image) == 0 or total % len(per_image):
            raise ValueError(f"the prompts hold {total} image tokens, which {len(per_image)} images cannot fill evenly")
        per_image[:] = total // len(per_image)
    starts = {k: np.concatenate([[0], np.cumsum(r)]) for k, r in rows.items()}
    own, image = [], 0
    for i, need in enumerate(wanted):
        first = image
        while need > 0 and image < len(per_image):
            need -= int(per_image[image])
            image += 1
        if need != 0:
            raise ValueError(
                f"request {i} has {wanted[i]} image tokens, which do not match the images' features "
                f"(images {first}..{image - 1} of {len(per_image)}); pass the processor's output unchanged"
            )
        own.append({k: images[k][starts[k][first] : starts[k][image]] for k in family.image_keys} if image > first else {})
    if image != len(per_image):
        raise ValueError(f"the inputs carry {len(per_image)} images but the prompts' image tokens use {image}")
    return _positions(model, family, tokens, own, token_rows)


def _positions(model, family: Family, tokens, own: list[dict], token_rows: Mapping) -> VisionPrompts:
    """Each request's mRoPE rows from the model's own ``get_rope_index``, run on that request alone."""
    n = len(tokens)
    lengths = np.array([len(t) for t in tokens], np.int64)
    if not family.mrope:
        return VisionPrompts(family, own, None, np.zeros(n, np.int64), lengths)
    inner = unwrap(model).model
    image_token = image_token_id(model)
    positions, deltas = [], np.zeros(n, np.int64)
    for i, t in enumerate(tokens):
        ids = torch.from_numpy(np.asarray(t, np.int64))[None]
        types = token_rows.get("mm_token_type_ids")
        types = (ids == image_token).long() if types is None else torch.as_tensor(np.asarray(types[i]), dtype=torch.long)[None]
        grid = own[i].get("image_grid_thw")
        with torch.no_grad():
            pos, delta = inner.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)
        positions.append(pos[:, 0])
        deltas[i] = int(delta.reshape(-1)[0])
    return VisionPrompts(family, own, positions, deltas, lengths)


def join(parts: list[VisionPrompts]) -> VisionPrompts:
    """Requests of several :class:`VisionPrompts` of one family, in order."""
    if any(part is None for part in parts):  # never drop one part's images because another part has none
        raise ValueError("cannot join prompts with images and prompts laid out without them")
    pos = None if parts[0].positions is None else [p for part in parts for p in part.positions]
    return VisionPrompts(parts[0].family, [im for part in parts for im in part.images], pos,
                         np.concatenate([part.deltas for part in parts]), np.concatenate([part.lengths for part in parts]))
