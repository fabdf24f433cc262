"""Vision-language examples -> one padding-free training batch, with the model's own (m)RoPE positions per example.

transformers' ``DataCollatorWithFlattening`` concatenates text examples into one (1, T) row with
position ids restarting at each example. A vision-language example carries more: its images (pixel
values, and for Qwen-VL each image's patch grid), and for multimodal-RoPE models (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL) three position ids per token (temporal, height, width) that only the model's
``get_rope_index`` knows how to build. :class:`DataCollatorForPackedVisionRows` builds them per
example, so they restart at every example exactly as the example alone would get them::

    examples  e0 (text, image a)   e1 (text)   e2 (images b, c)
    ->  input_ids / labels          (1, T)            T = tokens of all examples
        position_ids                (4, 1, T) mRoPE:  row 0 text positions 0..L_e-1, rows 1-3 get_rope_index(e)
                                    (1, T)    else:   0..L_e-1 per example
        pixel_values                a, b, c in stream order (Qwen-VL: (patches, C*t*p*p); LLaVA: (n, C, H, W))
        image_grid_thw              (n_images, 3)     Qwen-VL only

The sequence boundaries travel in the text position ids, not as ``cu_seq_lens_q/k`` keywords:
some VLMs (LLaVA) hand their keyword arguments to the vision tower too, whose non-causal attention
must not see the text's boundaries (prepack refuses that call). The leading text row is the one
transformers' Qwen-VL models read for packed attention (``position_ids.shape[0] == 4``);
``attn_implementation="prepack"`` turns its restarts into varlen attention, as it does for a text
batch, and builds no (T, T) mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .collate import IGNORE_INDEX, LOSS_MASKS
from .hf.registration import is_enabled

# Model types whose packed training step was checked against the unpacked batch (tests/test_collate_vision.py).
MROPE_MODELS: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PLAIN_POSITION_MODELS: tuple[str, ...] = ("llava",)
_TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", *LOSS_MASKS)
_IMAGE_KEYS = {**{kind: ("pixel_values", "image_grid_thw") for kind in MROPE_MODELS}, "llava": ("pixel_values",)}


@dataclass
class DataCollatorForPackedVisionRows:
    """Collate vision-language examples into one padding-free row, with per-example (m)RoPE positions.

    A ``data_collator`` for ``transformers.Trainer`` (pass ``TrainingArguments(remove_unused_columns=False)``:
    the Trainer would otherwise drop the image columns of a ``datasets.Dataset``) or a ``DataLoader``
    ``collate_fn``. Each example is one processor output: what ``processor(text=[t], images=imgs)``
    returns, with or without its batch dimension of 1, or a dataset row of lists.

    Labels are the example's ``labels`` (else its ``input_ids``) with ``separator_id`` on its first token,
    as ``DataCollatorWithFlattening`` makes them, and -100 wherever a ``completion_mask`` /
    ``assistant_masks`` is 0. The model must run prepack's attention (:func:`prepack.enable`): under
    transformers' own sdpa / eager, a model with ``use_cache`` on attends across the packed examples, so the
    collator refuses it. Any other key (videos, ``image_sizes``, ``second_per_grid_ts``, ...) is
    refused, naming the example: dropping it would train on something else.

    Attributes:
        model: the vision-language model the batches are for (``Qwen2VLForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``,
            ``LlavaForConditionalGeneration``, or their base models). Its config gives the image token id
            and the image sizes; for mRoPE models its own ``get_rope_index`` builds the positions. Only
            read, never written.
        separator_id: the label of each example's first token.
    """

    model: Any = field(repr=False)
    separator_id: int = IGNORE_INDEX
    _rope_index: Any = field(init=False, repr=False, default=None)

    def __post_init__(self):
        config = self.model.config
        kind = getattr(config, "model_type", None)
        if kind not in MROPE_MODELS + PLAIN_POSITION_MODELS:
            raise ValueError(
                f"DataCollatorForPackedVisionRows does not support {type(self.model).__name__} (model_type {kind!r}); "
                f"supported: {', '.join(MROPE_MODELS + PLAIN_POSITION_MODELS)}. Other vision-language models may need "
                "positions, masks (bidirectional image attention) or image keys this collator does not build"
            )
        if kind in MROPE_MODELS:
            base = getattr(self.model, "base_model", self.model)
            self._rope_index = getattr(base, "get_rope_index", None)
            if self._rope_index is None:
                raise ValueError(f"{type(self.model).__name__} is an mRoPE model without get_rope_index; pass the model itself")
        self._kind = kind
        self._image_token = int(config.image_token_id)
        self._video_token = getattr(config, "video_token_id", None)

    def __call__(self, features: Sequence[Mapping[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        """E examples -> one batch.

        Args:
            features: E examples, the e-th with ``input_ids`` (L_e,) or (1, L_e); optionally ``attention_mask``
                (all ones: the examples are not padded), ``labels``, ``completion_mask`` / ``assistant_masks``,
                ``mm_token_type_ids`` (checked against the image tokens), and its images: ``pixel_values``
                ((P_e, D) with ``image_grid_thw`` (n_e, 3) for Qwen-VL; (n_e, C, H, W) for LLaVA).

        Returns:
            ``input_ids``, ``labels``: (1, T) int64, T = sum(L_e); ``position_ids``: (4, 1, T) int64 for mRoPE
            models (text positions, then temporal, height, width), else (1, T); ``pixel_values``: the images
            concatenated in stream order (absent when no example has one); ``image_grid_thw`` (n, 3) int64
            for Qwen-VL.
        """
        self._check_call(features, return_tensors)
        allowed = (*_TOKEN_KEYS, *_IMAGE_KEYS[self._kind])
        with_labels = "labels" in features[0]
        ids, labels, positions, text_positions, pixels, grids = [], [], [], [], [], []
        for e, example in enumerate(features):
            tokens, is_image = self._checked_tokens(example, e, allowed, with_labels)
            label = self._labels(example, tokens, with_labels, e)
            image, grid = self._images(example, is_image, e)
            ids.append(tokens)
            labels.append(label)
            text_positions.append(np.arange(len(tokens)))
            if self._rope_index is not None:
                positions.append(self._mrope(tokens, is_image, grid))
            if image is not None:
                pixels.append(image)
                if grid is not None:
                    grids.append(grid)
        return _batch(ids, labels, text_positions, positions if self._rope_index is not None else None, pixels, grids)

    def _check_call(self, features: Sequence[Mapping[str, Any]], return_tensors: str | None) -> None:
        """Refuse a call the collator cannot answer exactly: other than torch tensors, no examples, or a model
        whose attention would let the packed examples see each other."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f'DataCollatorForPackedVisionRows returns torch tensors only (return_tensors="pt"), got {return_tensors!r}')
        if not features:
            raise ValueError("DataCollatorForPackedVisionRows got no examples")
        if not is_enabled(self.model):
            # transformers isolates packed examples by their position ids only when no cache is in play, and a model
            # with use_cache=True (the default, in training too) makes one: its sdpa/eager would attend across examples
            raise ValueError(
                f"{type(self.model).__name__} runs {self.model.config._attn_implementation!r} attention, which would let the "
                "packed examples attend to each other; call prepack.enable(model) (or "
                'model.set_attn_implementation("prepack")) before training on these batches'
            )

    def _checked_tokens(
        self, example: Mapping[str, Any], e: int, allowed: tuple[str, ...], with_labels: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Example e's ``input_ids`` (L,) and which of them are image tokens (L,) bool, after refusing an unknown key,
        labels present unlike example 0, a per-token column of another length than L, padding, video tokens, or
        ``mm_token_type_ids`` that do not mark exactly its image tokens."""
        unknown = [k for k in example if k not in allowed]
        if unknown:
            raise ValueError(
                f"example {e} has {unknown}, which DataCollatorForPackedVisionRows does not handle for "
                f"{self._kind} (it handles {', '.join(allowed)}); remove them or use a collator that builds them"
            )
        if ("labels" in example) != with_labels:
            raise ValueError(f"example {e} {'has no' if with_labels else 'has'} labels, unlike example 0")
        tokens = _tokens(example, "input_ids", e)
        n = len(tokens)
        for key in ("attention_mask", "labels", "mm_token_type_ids", *LOSS_MASKS):
            if key in example and len(_tokens(example, key, e)) != n:
                raise ValueError(f"example {e} has {n} input_ids but {len(_tokens(example, key, e))} {key}")
        if "attention_mask" in example and not (_tokens(example, "attention_mask", e) == 1).all():
            raise ValueError(f"example {e} is padded (its attention_mask has zeros); pass each example unpadded")
        is_image = tokens == self._image_token
        if self._video_token is not None and (tokens == self._video_token).any():
            raise ValueError(f"example {e} has video tokens (id {self._video_token}); videos are not handled")
        if "mm_token_type_ids" in example:
            types = _tokens(example, "mm_token_type_ids", e)
            if not np.array_equal(types != 0, is_image) or (types > 1).any():
                raise ValueError(
                    f"example {e}: mm_token_type_ids mark other tokens than its image tokens (id {self._image_token}); "
                    "only images (type 1) are handled"
                )
        return tokens, is_image

    def _labels(self, example: Mapping[str, Any], tokens: np.ndarray, with_labels: bool, e: int) -> np.ndarray:
        """Example e's labels (L,) int64: its ``labels`` (else ``tokens``, (L,)), ``separator_id`` on the first token,
        -100 wherever a loss mask is 0. A new array: the example is never written."""
        label = (_tokens(example, "labels", e) if with_labels else tokens).astype(np.int64)  # a copy
        label[0] = self.separator_id
        for key in LOSS_MASKS:
            if key in example:
                label[_tokens(example, key, e) == 0] = IGNORE_INDEX
        return label

    def _images(self, example: Mapping[str, Any], is_image: np.ndarray, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Example e's pixel values and grids, checked against its image tokens: (None, None) when it has no image."""
        n_tokens = int(is_image.sum())
        if "pixel_values" not in example or example["pixel_values"] is None:
            if "image_grid_thw" in example and example["image_grid_thw"] is not None and len(_tensor(example["image_grid_thw"])):
                raise ValueError(f"example {e} has image_grid_thw but no pixel_values")
            if n_tokens:
                raise ValueError(f"example {e} has {n_tokens} image tokens but no pixel_values")
            return None, None
        pixels = _tensor(example["pixel_values"])
        config = self.model.config
        if self._kind in MROPE_MODELS:
            if "image_grid_thw" not in example:
                raise ValueError(f"example {e} has pixel_values but no image_grid_thw")
            grid = _tensor(example["image_grid_thw"]).to(torch.int64).reshape(-1, 3)
            merge = config.vision_config.spatial_merge_size
            if pixels.ndim != 2 or pixels.shape[0] != int(grid.prod(-1).sum()):
                raise ValueError(
                    f"example {e} has pixel_values of shape {tuple(pixels.shape)} for image_grid_thw {grid.tolist()} "
                    f"({int(grid.prod(-1).sum())} patches)"
                )
            runs = _runs(is_image)
            per_image = (grid.prod(-1) // merge**2).tolist()
            if runs != per_image:
                raise ValueError(
                    f"example {e} has image-token runs of {runs} tokens but its images need {per_image} "
                    f"(image_grid_thw {grid.tolist()}, spatial_merge_size {merge}); each image is one run of its tokens"
                )
            return pixels, grid
        vision = config.vision_config
        per_image = (vision.image_size // vision.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
        if pixels.ndim != 4:
            raise ValueError(f"example {e} has pixel_values of shape {tuple(pixels.shape)}; LLaVA takes (n_images, C, H, W)")
        if n_tokens != per_image * pixels.shape[0]:
            raise ValueError(
                f"example {e} has {n_tokens} image tokens for {pixels.shape[0]} images of {per_image} tokens each"
            )
        return pixels, None

    def _mrope(self, tokens: np.ndarray, is_image: np.ndarray, grid: torch.Tensor | None) -> torch.Tensor:
        """(3, 1, L): the example's temporal/height/width positions, from the model's own get_rope_index on it alone."""
        ids = torch.from_numpy(tokens.astype(np.int64))[None]
        types = torch.from_numpy(is_image.astype(np.int64))[None]
        with torch.no_grad():
            position_ids, _ = self._rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)
        return position_ids


def _batch(
    ids: list[np.ndarray],
    labels: list[np.ndarray],
    text_positions: list[np.ndarray],
    mrope_positions: list[torch.Tensor] | None,
    pixels: list[torch.Tensor],
    grids: list[torch.Tensor],
) -> dict[str, Any]:
    """The E examples' columns -> one batch.

    Args:
        ids, labels, text_positions: E arrays (L_e,) each.
        mrope_positions: E tensors (3, 1, L_e) for mRoPE models; None for the others.
        pixels: the images of the examples that have any, in stream order; grids: their (n_e, 3) grids (Qwen-VL).

    Returns:
        ``input_ids``, ``labels``: (1, T) int64; ``position_ids``: (4, 1, T) int64 (the text row first) with
        ``mrope_positions``, else (1, T); ``pixel_values`` and ``image_grid_thw`` concatenated, when there are any.
    """
    batch: dict[str, Any] = {
        "input_ids": torch.from_numpy(np.concatenate(ids).astype(np.int64))[None],
        "labels": torch.from_numpy(np.concatenate(labels).astype(np.int64))[None],
    }
    text = torch.from_numpy(np.concatenate(text_positions).astype(np.int64))[None]
    if mrope_positions is None:
        batch["position_ids"] = text
    else:
        # (4, 1, T): the text row first, as transformers' Qwen-VL models read a packed batch
        batch["position_ids"] = torch.cat([text[None], torch.cat(mrope_positions, dim=-1)], dim=0)
    if pixels:
        batch["pixel_values"] = torch.cat(pixels, dim=0)
        if grids:
            batch["image_grid_thw"] = torch.cat(grids, dim=0)
    return batch


def _runs(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True in ``mask``, in order."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


def _tensor(value) -> torch.Tensor:
    """A tensor as given; a dataset row's lists as a tensor (float32 for floats, as a processor returns them)."""
    if isinstance(value, torch.Tensor):
        return value
    arr = np.asarray(value)
    return torch.from_numpy(arr.astype(np.float32) if arr.dtype.kind == "f" else arr)


def _tokens(example: Mapping[str, Any], key: str, e: int) -> np.ndarray:
    """Example e's per-token column ``key`` as (L,) integers; a leading batch dimension of 1 is dropped."""
    value = example[key]
    arr = value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "biu"):
        raise ValueError(f"example {e}: {key} must be one list of integers, got shape {arr.shape} dtype {arr.dtype}")
    if key == "input_ids" and arr.size == 0:
        raise ValueError(f"example {e} has no input_ids")
    return arr
