"""What prepack can pack exactly, as code: the model check and each layer's attention semantics.

prepack's promise is the logits and caches each prompt would get alone. A packed
stream keeps that promise only where every token-mixing operation is attention
that prepack can restrict to one request. So:

* :func:`check_model` refuses, before anything runs, a model with token mixing
  outside attention (recurrent, convolutional and linear-attention layers leak
  state from one packed prompt into the next) or with caches that are not plain
  per-layer keys and values (sparse-attention indexers; KV shared across layers is plain keys and values read by
  later layers, :func:`kv_share_sources`).
  It reads the model's structure (its cache layer types and its modules), so a
  new hybrid architecture is refused too, not only the ones named here.
* :func:`layer_attention` turns one attention call into the semantics prepack
  implements (causal, sliding window, chunked local attention, soft-capping,
  attention sinks), cross-checked against the layer's own config and attributes,
  and raises for any keyword or attribute it does not implement.

Errors are :class:`UnsupportedModelError` and name the model class and the feature.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

# Cache layer types whose per-token state is exactly one layer's keys and values.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")

# transformers' cache layer types of attention beside a mixer in one layer -> the attention they hold
HYBRID_ATTENTION = {"hybrid": "full_attention", "hybrid_sliding": "sliding_attention"}

# Attention kwargs prepack implements, checked in :func:`layer_attention`.
SEMANTIC_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "is_causal")
# The packed layout, in the names of transformers' flash path and DataCollatorWithFlattening.
LAYOUT_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")
# prepack's own: a packed call's layout, kernel and KV sink (:class:`prepack.executor.call.PackedCall`).
PREPACK_KWARGS = ("prepack",)
# Passed down through model forwards to every layer; they do not change what attention computes.
INERT_KWARGS = (
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "cache_position",
    "logits_to_keep", "layer_idx", "past_key_value", "past_key_values", "cache", "position_embeddings", "dropout", "scaling",
    # Trainer's loss normalisation, forwarded through **kwargs to every layer
    "num_items_in_batch",
)
ALLOWED_KWARGS = frozenset(SEMANTIC_KWARGS + LAYOUT_KWARGS + PREPACK_KWARGS + INERT_KWARGS)


class UnsupportedModelError(TypeError):
    """prepack cannot give this model (or this layer) the results of running each prompt alone."""


class LayerAttention(NamedTuple):
    """One layer's attention, as prepack computes it.

    Attributes:
        window: sliding window in transformers' sense (a query sees itself and the
            ``window - 1`` tokens before it), or None.
        chunk: chunked local attention (``attention_chunk_size``): queries see only keys in the
            same multiple of ``chunk`` positions of their own request, or None.
        softcap: ``softcap * tanh(score / softcap)`` before the softmax; 0 for none.
        sinks: (H,) attention-sink logits (gpt-oss), or None.
    """

    window: int | None
    chunk: int | None
    softcap: float
    sinks: torch.Tensor | None


def _name(module) -> str:
    layer = getattr(module, "layer_idx", None)
    return f"{type(module).__name__}" + (f" (layer {layer})" if layer is not None else "")


def _layer_type(module) -> str | None:
    config = getattr(module, "config", None)
    types, idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if types is None or idx is None or not 0 <= idx < len(types):
        return None
    return types[idx]


def layer_attention(module, kwargs: dict, num_tokens: int) -> LayerAttention:
    """The attention ``module`` asks for in this call, or an :class:`UnsupportedModelError`.

    Refuse by default: a keyword prepack does not know, or a layer whose config or attributes
    ask for something its keywords do not carry (a sliding layer with no window, a layer with
    sinks that were not passed), raises instead of running plain causal attention.

    Args:
        module: the attention module transformers called the attention function with.
        kwargs: the call's keyword arguments (besides query, key, value and the mask).
        num_tokens: the tokens of the packed stream in this call (for position-dependent features).
    """
    name = _name(module)
    # output_* flags (output_attentions, output_router_logits, ...) choose what a model returns, not what it computes
    # a keyword whose value is None asks for nothing (Gemma 4's multimodal class forwards labels=None to every layer)
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in ALLOWED_KWARGS and not k.startswith("output_"))
    if unknown:
        raise UnsupportedModelError(
            f"{name} passed attention keyword(s) {', '.join(unknown)} that prepack does not implement; "
            "it refuses rather than ignore them"
        )
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise UnsupportedModelError(f"{name} asks for non-causal attention; prepack packs causal decoder prompts only")
    config = getattr(module, "config", None)
    layer_type = _layer_type(module)
    # a hybrid layer's attention (FalconH1, Zamba) is plain attention beside a mixer check_model accepted
    layer_type = HYBRID_ATTENTION.get(layer_type, layer_type)
    if layer_type is not None and layer_type not in ATTENTION_LAYER_TYPES:
        raise UnsupportedModelError(f"{name} is a {layer_type!r} layer, which prepack does not implement")

    window = kwargs.get("sliding_window")
    if layer_type == "sliding_attention" and not window:
        # the model's own mask is create_sliding_window_causal_mask(config.sliding_window)
        window = getattr(module, "sliding_window", None) or getattr(config, "sliding_window", None)
        if not window:
            raise UnsupportedModelError(f"{name} is a sliding-window layer but neither its call nor its config gives a window")
    if window and layer_type in ("full_attention", "chunked_attention"):
        raise UnsupportedModelError(
            f"{name} is a {layer_type!r} layer but its call carries sliding_window={window}; "
            "the model's own mask and its attention disagree, so prepack cannot tell which is meant"
        )

    chunk = None
    chunk_size = getattr(config, "attention_chunk_size", None)
    if layer_type == "chunked_attention" or (layer_type is None and chunk_size):
        if not chunk_size:
            raise UnsupportedModelError(f"{name} is a chunked-attention layer but its config has no attention_chunk_size")
        if window:
            raise UnsupportedModelError(f"{name} asks for both chunked attention and a sliding window")
        chunk = int(chunk_size)

    softcap = kwargs.get("softcap") or 0.0
    config_softcap = getattr(config, "attn_logit_softcapping", None)
    if config_softcap and not softcap:
        raise UnsupportedModelError(
            f"{name}'s config soft-caps attention logits (attn_logit_softcapping={config_softcap}) "
            "but its call carries no softcap"
        )

    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    if sinks is None and isinstance(getattr(module, "sinks", None), torch.Tensor):
        raise UnsupportedModelError(f"{name} has attention sinks but its call did not pass them (s_aux)")

    if getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True):
        # Llama 4's NoPE layers scale queries by the token's index in the forward, not by its
        # position id: in a packed stream that index is the stream's, so it is exact only while
        # the scale is still 1 (index + 1 < floor_scale)
        floor_scale = int(getattr(module, "floor_scale", 1))
        if num_tokens >= floor_scale:
            raise UnsupportedModelError(
                f"{name} scales queries by token index (attn_temperature_tuning, floor_scale={floor_scale}); "
                f"a packed stream of {num_tokens} tokens would give later prompts another scale: "
                f"keep token_budget below {floor_scale}"
            )
    return LayerAttention(int(window) if window else None, chunk, float(softcap), sinks)


# Attention classes (transformers 5.25) that run attention more than once at one layer index in a forward, each call
# over a key/value stream of its own that the model's own cache keeps apart: prepack's KV store gives the k-th call at
# a layer index in a step a pool of its own (:class:`prepack.executor.kvstore.KVStore`'s ``revisits``), in call order.
REVISITING_ATTENTION = {
    # differential attention: two calls per layer, the same keys with each half of the values (chunked along heads,
    # a per-token transform of the one cached value tensor), so each call's stream is a per-token function of it
    "DiffLlamaAttention": "two attention calls per layer over the two halves of its values",
    # hierarchical reasoning: the H and L stacks share layer indices 0..num_layers_per_stack-1 and run in cycles;
    # each run writes its own cache slot (layer_idx + cycle_offset), in a fixed order
    "HrmTextAttention": "its stacks run in cycles, each run with a cache slot of its own (layer_idx + cycle_offset)",
    # recurrent depth: the middle layers run n_recurrent_loops times, each loop after the first writing a deep copy of
    # the layer's cache layer that the model appends (recurrent_kv_cache_mode="per_loop"; "last_loop" is refused)
    "DoryAttention": "its recurrent loops each keep a cache layer of their own (recurrent_kv_cache_mode='per_loop')",
}


def revisiting_attention(model) -> bool:
    """Whether ``model`` runs attention several times at one layer index per forward, each call over a stream of
    its own (:data:`REVISITING_ATTENTION`). Any other model doing so is refused at its second call."""
    return any(type(m).__name__ in REVISITING_ATTENTION for m in model.modules())


def mixes_outside_attention(config) -> bool:
    """Whether ``config``'s layers include token mixers other than attention (``layer_types`` such as
    ``"linear_attention"``, ``"conv"``, ``"mamba"``): their layers see no attention layout."""
    types = getattr(config, "layer_types", None) or ()
    return any(t not in ATTENTION_LAYER_TYPES for t in types)


def has_attention_sinks(model) -> bool:
    """Whether any attention module of ``model`` carries sinks (gpt-oss's ``sinks`` parameter)."""
    return any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules())


def check_model(model) -> None:
    """Raise a clear error for models prepack cannot pack exactly, before anything runs."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None:
        raise UnsupportedModelError(f"{name} is not a transformers PreTrainedModel (it has no .config)")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; prepack packs decoder-only prompts")
    from ..mixers import mixer_modules

    mixers = mixer_modules(model)
    mixer_ids = {id(m) for _, m, _ in mixers}
    # token mixing no registered kind accounts for is the first reason (RWKV, RecurrentGemma: recurrent layers that
    # also bypass AttentionInterface are refused for their recurrence, the precise reason)
    mixing = _token_mixing_outside_attention(model, {path for path, _, _ in mixers})
    if mixing:
        raise UnsupportedModelError(f"{name} cannot be packed exactly: {mixing}")
    if not getattr(model, "_supports_attention_backend", False) and not _attention_routes_through_interface(model, mixer_ids, bool(mixers)):
        if _attention_calls_interface(model):
            raise UnsupportedModelError(
                f"{name} is not marked _supports_attention_backend by transformers and prepack has not verified its "
                f"attention class ({', '.join(sorted(_attention_classes(model)))}; prepack.hf.support.UNMARKED_ATTENTION "
                "lists those it has): such a model need not take positions from position_ids (BART-family decoders "
                "count them as arange(length) of the forward, which in a packed stream runs across the prompts) nor "
                "hand attention the call's keywords"
            )
        raise UnsupportedModelError(
            f"{name} does not route attention through transformers' AttentionInterface, so prepack "
            "cannot give it packed attention; use a decoder-only model that supports attn_implementation"
        )
    dynamic = _dynamic_mask_attention(model)
    if dynamic:
        raise UnsupportedModelError(f"{name} cannot be packed exactly: {dynamic}")
    loops = getattr(config.get_text_config(decoder=True), "recurrent_kv_cache_mode", "per_loop")
    if loops != "per_loop":
        raise UnsupportedModelError(
            f"{name} cannot be packed exactly: recurrent_kv_cache_mode={loops!r} makes its loops before the last read the "
            "last loop's cached keys without writing their own (DoryPastReader), a stream prepack's caches and KV store "
            "do not hold; recurrent_kv_cache_mode='per_loop' (the default) is exact"
        )
    if getattr(config.get_text_config(decoder=True), "alibi", False):
        raise UnsupportedModelError(
            f"{name} cannot be packed exactly: its ALiBi position bias (config.alibi) is built from the forward's "
            "attention mask into a dense bias, which in a packed stream would count positions across the packed prompts"
        )
    reason = _unsupported_cache_layers(model, mixers)
    if reason:
        raise UnsupportedModelError(f"{name} cannot be packed exactly: {reason}")


# Attention classes of models transformers 5.25 does not mark ``_supports_attention_backend`` (their decoder layers
# drop keywords on the way to attention) that prepack packs exactly: each calls ``ALL_ATTENTION_FUNCTIONS``, is handed
# the forward's position_ids (where the packed call is found: :func:`prepack.executor.call.carried_by`), and its model
# takes its positions from the position_ids it is given.
UNMARKED_ATTENTION = {
    "FalconAttention": "its decoder layer passes position_ids (and no other keyword) on; RoPE from position_ids",
    "StableLmAttention": "its decoder layer passes position_ids (and no other keyword) on; RoPE from position_ids",
    "BioGptAttention": "keywords reach it; its learned positions are read at the position_ids given",
}


def _attention_routes_through_interface(model, mixer_ids: set, hybrid: bool) -> bool:
    """Whether every attention module of a model that transformers does not mark ``_supports_attention_backend``
    calls ``ALL_ATTENTION_FUNCTIONS``, the registry prepack's implementation is looked up in. Read from the class's
    own forward code, not from a list.

    transformers marks hybrids False since vLLM-style backends cannot hold their recurrent state: their attention
    modules are accepted by their code. Other models it marks False are accepted only where their attention class is
    in :data:`UNMARKED_ATTENTION`: calling ``ALL_ATTENTION_FUNCTIONS`` is not enough (Marian's, BART's decoders
    compute positions from the forward's length and ignore the position_ids they are given, so a packed stream
    would get wrong positions). A layer that gets no packed layout inside a prepack call is refused there
    (:func:`prepack.hf.registration.prepack_attention`), never run across the packed prompts."""
    found = False
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx") and id(module) not in mixer_ids:
            forward = inspect.unwrap(type(module).forward)
            if "ALL_ATTENTION_FUNCTIONS" not in forward.__code__.co_names:
                return False
            if not hybrid and type(module).__name__ not in UNMARKED_ATTENTION:
                return False
            found = True
    if found or not hybrid:
        return found
    # a model of mixers only (Mamba2) has no attention to route: every layer's cache type is a mixer's
    return not any(t in ATTENTION_LAYER_TYPES or t.startswith("hybrid") for t in _cache_layer_types(model))


def _dynamic_mask_attention(model) -> str | None:
    """Why attention that builds its own mask from the keys it sees cannot be packed (Doge's dynamic mask attention).

    ``DogeAttention.prepare_dynamic_mask`` (transformers 5.25) turns the values of every key the module sees into a
    per-key bias (``exp(A * softplus(dt_proj(values)))``) and keeps only each query's ``keep_window_size`` highest
    keys, inside the module, before ``AttentionInterface``. prepack's attention receives that (B, H, Lq, Lk) mask
    over the whole packed stream: the top-k would rank other requests' keys, and in decoding the module sees only
    the new tokens' values (the cached keys are added inside attention), so the cached keys would have no bias.
    """
    for module in model.modules():
        if callable(getattr(module, "prepare_dynamic_mask", None)):
            return (
                f"{type(module).__name__} builds its own attention mask inside the module (prepare_dynamic_mask: a bias "
                "from each key's value states, and each query's top keep_window_size keys), outside transformers' "
                "AttentionInterface; over a packed stream that selection would rank other requests' keys, and when "
                "decoding it would see only the new tokens' values, not the cached keys'"
            )
    return None


def _attention_classes(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")}


def _attention_calls_interface(model) -> bool:
    """Whether ``model`` has attention modules (with a ``layer_idx``) and every one calls ``ALL_ATTENTION_FUNCTIONS``."""
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    return bool(modules) and all(
        "ALL_ATTENTION_FUNCTIONS" in inspect.unwrap(type(m).forward).__code__.co_names for m in modules
    )


def _cache_layer_types(model) -> list[str]:
    """transformers' cache layer type of each decoder layer (``get_layer_types_and_kwargs``), [] if it has none."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        return list(get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))[0])
    except Exception:  # older transformers, or a config it cannot lay a cache out for
        return []


def stateless_layers(model) -> set[int]:
    """Decoder layers with no attention module (NemotronH's MLP / MoE blocks): transformers gives them a
    ``dummy`` cache layer, and they carry nothing from token to token."""
    attending = {getattr(m, "layer_idx", None) for m in model.modules() if type(m).__name__.endswith("Attention")}
    return {i for i in range(len(_cache_layer_types(model))) if i not in attending}


def _token_mixing_outside_attention(model, mixers: set = frozenset()) -> str | None:
    """Modules that carry state from token to token outside attention: it would leak across packed prompts.

    ``mixers``: paths of the modules :mod:`prepack.mixers` runs packed (their inner convolutions are theirs)."""
    for path, module in model.named_modules():
        if any(path == m or path.startswith(m + ".") for m in mixers):
            continue
        if isinstance(module, torch.nn.Conv1d):
            return f"it has a convolution over tokens ({path}: {type(module).__name__}), which would mix packed prompts"
        for pname, _ in module.named_parameters(recurse=False):
            if pname in ("A_log", "dt_bias", "time_decay", "time_first"):
                return (
                    f"it has recurrent (state-space / linear-attention) layers ({path}.{pname} of "
                    f"{type(module).__name__}), whose state would carry from one packed prompt into the next"
                )
        if hasattr(module, "igate_preact") and hasattr(module, "fgate_preact"):  # xLSTM's mLSTM: input / forget gates
            return (
                f"it has recurrent (xLSTM) layers ({path}: {type(module).__name__}, with input and forget gates), "
                "whose state would carry from one packed prompt into the next"
            )
    return None


def kv_share_sources(config) -> dict[int, int]:
    """Layers that read another layer's keys and values instead of computing their own -> that layer.

    transformers' cross-layer KV sharing (Gemma 3n, Gemma 4: ``num_kv_shared_layers``): the config's
    ``kv_sharing_modes`` marks the last layers ``"reuse"``, and each reads the keys and values that the
    ``"store"`` layer of its own layer type left in the forward's ``shared_kv_states``. Those layers keep no
    cache of their own (transformers gives them a ``DummyLayer``); prepack's caches and KV store hand them
    their source layer's entries. Empty for a model without sharing.

    Args:
        config: the model's config (its decoder text config is read).

    Raises:
        UnsupportedModelError: a sharing mode other than ``"reuse"`` / ``"store"``, or a layer that reuses keys
            no layer of this model stores (a drafter reading its target model's cache).
    """
    config = config.get_text_config(decoder=True)
    if not getattr(config, "num_kv_shared_layers", 0):
        return {}
    modes, types = list(config.kv_sharing_modes), list(config.layer_types)
    odd = sorted({m for m in modes if m not in (None, "reuse", "store")})
    if odd:
        raise UnsupportedModelError(f"{type(config).__name__} shares keys and values across layers in mode(s) {odd}, which prepack does not implement")
    named = getattr(config, "kv_source_layers", None)
    if named is not None:  # Kolibri 1.1: each layer names the layer it reads
        return {i: int(s) for i, s in enumerate(named) if s != i}
    stores = {}
    for j, m in enumerate(modes):
        if m == "store" and stores.setdefault(types[j], j) != j:
            raise UnsupportedModelError(
                f"{type(config).__name__} has two layers ({stores[types[j]]}, {j}) storing {types[j]!r} keys and values "
                "for later layers; which one a reusing layer reads is not in its config, so prepack cannot map it"
            )
    sources = {}
    for i, m in enumerate(modes):
        if m != "reuse":
            continue
        if types[i] not in stores:
            raise UnsupportedModelError(
                f"{type(config).__name__}'s layer {i} reuses {types[i]!r} keys and values that no layer of this model "
                "computes (they come from another model's forward, as a drafter's do); prepack cannot run it alone"
            )
        sources[i] = stores[types[i]]
    return sources


def _unsupported_cache_layers(model, mixers: list = ()) -> str | None:
    """A cache layer type other than plain keys and values per attention layer (transformers' own view), unless
    every layer of that type holds a mixer :mod:`prepack.mixers` runs packed (``mixers``: its (path, module, kind)).

    Layers that read another layer's keys and values (:func:`kv_share_sources`) are plain attention too.
    """
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # pragma: no cover - older transformers
        return None
    config = model.config.get_text_config(decoder=True)
    try:
        types, _ = get_layer_types_and_kwargs(config)
    except Exception:  # a config transformers itself cannot lay a cache out for: judge by modules only
        return None
    try:
        shared = kv_share_sources(config)
    except UnsupportedModelError as e:
        return str(e)
    from ..mixers.kinds import mixer_layer_idx

    covered = {(mixer_layer_idx(m), t) for _, m, kind in mixers for t in kind.layer_types}
    if mixers:  # a hybrid's MLP-only layers (NemotronH): a dummy cache layer, nothing carried across tokens
        covered |= {(i, "dummy") for i in stateless_layers(model) - {mixer_layer_idx(m) for _, m, _ in mixers}}
    odd = sorted({t for i, t in enumerate(types) if t not in ATTENTION_LAYER_TYPES and i not in shared and (i, t) not in covered})
    if not odd:
        return None
    sparse = _sparse_attention(model, odd)
    if sparse:
        return sparse
    kinds = {
        "dummy": "layers that keep no KV of their own (layers without attention)",
        "conv": "convolutional layers",
        "linear_attention": "linear-attention / recurrent layers",
        "hybrid": "hybrid linear-attention layers",
        "hybrid_sliding": "hybrid linear-attention layers",
        "indexed_attention": "sparse attention with a key indexer",
    }
    what = "; ".join(f"{t!r} ({kinds.get(t, 'not plain attention')})" for t in odd)
    return f"its cache has layer types {what}, and prepack builds caches of plain per-layer keys and values only"


# cache layer types of sparse attention whose selection runs inside the attention module (transformers' names)
_INDEXED = ("indexed_attention",)
_COMPRESSED = ("compressed_sparse_attention", "heavily_compressed_attention")


def _module_names(model, suffix: str) -> str:
    return ", ".join(sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith(suffix)})) or "?"


def _sparse_attention(model, odd: list[str]) -> str | None:
    """Why sparse attention (DeepSeek V3.2's DSA and its kin, DeepSeek V4's compressed attention) cannot be packed.

    Read from transformers 5.25's modeling files: the indexer (``*Indexer``) runs inside the attention module,
    not through ``AttentionInterface``. It scores each query against every key of the forward plus its layer's
    indexer key cache (``cache.update_indexer``), masks the scores with the dense (B, 1, S, T) mask of the whole
    forward, takes ``min(index_topk, T)`` of them and folds the choice into that mask. In a packed stream that
    mask and that cache span every request, so a query's top-k would be chosen among other requests' keys; keeping
    them per request needs a per-request dense mask and indexer keys in prepack's caches and KV store, which it
    does not have. DeepSeek V4's compressors pool every ``compress_rate`` consecutive tokens of the forward into
    one key/value entry, so a window would pool two requests' tokens.
    """
    if any(t in _COMPRESSED for t in odd):
        return (
            f"in a packed stream its compressors ({_module_names(model, 'Compressor')}) would pool two requests' tokens "
            "into one key/value entry: they pool every compress_rate consecutive tokens of the forward (cache layer "
            f"types {', '.join(t for t in odd if t in _COMPRESSED)}), and an indexer ({_module_names(model, 'Indexer')}) "
            "picks top-k entries among them"
        )
    if any(t in _INDEXED for t in odd):
        return (
            f"in a packed stream its sparse-attention indexer ({_module_names(model, 'Indexer')}) would choose a query's "
            "top-k keys among other requests' keys: it runs inside the attention module, outside transformers' "
            "AttentionInterface, and ranks each query's candidates among all keys of the forward (and its cache: "
            "cache.update_indexer) under the forward's dense attention mask; prepack gives that module neither a "
            "per-request dense mask nor per-request indexer keys"
        )
    return None
