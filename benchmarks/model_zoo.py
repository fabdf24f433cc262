"""Conformance sweep: every causal-LM model type in transformers, tiny, packed vs. run alone.

For each type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this builds a tiny random-weight
model (a generic shrink of the default config, plus the hand-made per-type overrides of
``benchmarks/zoo_configs.py``), then, in fp32 on CPU, checks prepack against transformers itself:

* last-token logits of ``prepack.prefill`` against each prompt run alone (max abs <= 1e-4),
  on every CPU backend, with prompts longer than any window or chunk and more tokens than
  one token budget holds;
* each request's cache (``PrefillResult.dynamic_caches``) against a solo prefill's cache;
* 8 greedy tokens of ``prepack.generate`` against left-padded ``model.generate``.

Each type runs in its own subprocess with a timeout, and is classified as ``exact``,
``refused`` (prepack raised its ``UnsupportedModelError``, naming the model and the reason),
``not buildable tiny`` (our tiny config is wrong), ``transformers fails`` (plain transformers, no prepack,
fails: its own default config does not build, or the solo run or padded ``generate`` raises; the detail
names the call),
or, the outcomes that must never appear, ``silently wrong`` and ``prepack crash``.

    python benchmarks/model_zoo.py                      # the whole sweep -> docs/models.md
    python benchmarks/model_zoo.py --only gpt_oss llama4_text --out -   # a few types, to stdout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root, for tests.models
from tests.models import ROPE_ORIG, rope_parameters  # noqa: E402 - the RoPE rows' parameters, as tests/test_rope.py's
from zoo_configs import CONFIG_TYPE, DEFAULT_FIXES, OVERRIDES  # noqa: E402 - hand-made tiny configs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TOL = 1e-4
LENGTHS = [1, 2, 3, 5, 8, 9, 13, 17, 24, 31, 40, 7, 11]  # several longer than WINDOW and CHUNK
TOKEN_BUDGET = 64  # far below the 171 tokens above: several forwards
NEW_TOKENS = 8
WINDOW = CHUNK = 8
# flex (eager on CPU) and reference (float64 math) compute what these do; the grid tests check them against flash-attn
BACKENDS = ("sdpa_varlen", "sdpa_masked")
# "exact prefill": prefill logits and each request's continued cache exact, generate refused with its reason (models
# with mixers outside attention, prepack.mixers, whose recurrent state prepack's decode engine does not hold yet)
OUTCOMES = ("exact", "exact prefill", "refused", "not buildable tiny", "transformers fails", "silently wrong", "prepack crash")

# A generic shrink: set where the default config has the attribute.
SHRINK = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=512, max_position_embeddings=256, sliding_window=WINDOW, attention_chunk_size=CHUNK,
    # GPT-2 / OPT / Falcon style names
    n_embd=64, n_layer=4, n_head=4, n_positions=256, n_inner=128, d_model=64, ffn_dim=128, num_layers=4,
    n_ctx=256, ffn_hidden_size=128, word_embed_proj_dim=64, multi_query_group_num=2, num_heads=4,
    # mixture of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    moe_num_experts=4, moe_topk=2, expert_interval=1,
    # multi-head latent attention: a value head dim unlike the query/key head dim
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
    # state-space / recurrent layers
    mamba_d_state=8, mamba_n_heads=8, mamba_d_head=16,  # n_heads * d_head = 2 * hidden_size
    mamba_n_groups=1, state_size=8, ssm_state_size=8,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    conv_L_cache=3, block_dim=64, block_ff_dim=128, rnn_hidden_size=64, lru_width=64,
    # misc
    embedding_size=64, rotary_dim=8, partial_rotary_factor=0.5,
    # decoders of encoder-decoder families (BartForCausalLM, ...)
    decoder_layers=4, encoder_layers=4, decoder_attention_heads=4, encoder_attention_heads=4,
    decoder_ffn_dim=128, encoder_ffn_dim=128,
)
# Rows beyond the model types: "<type>@<variant>", a RoPE type or a config variant on a base type.
# variant -> (config kwargs, what is done to the built model: None, "train", "bfloat16", "float16")
VARIANTS: dict[str, tuple[dict, str | None]] = {
    **{f"rope_{t}": (dict(rope_parameters=rope_parameters(t)), None)
       for t in ("linear", "yarn", "longrope", "llama3", "proportional")},
    # dynamic NTK scales past max_position_embeddings: 44 lets 40-token prompts prefill and refuses decoding past 44
    "rope_dynamic": (dict(rope_parameters=rope_parameters("dynamic"), max_position_embeddings=44), None),
    "phi3_longrope": (dict(rope_parameters=rope_parameters("longrope"), original_max_position_embeddings=ROPE_ORIG), None),
    "gemma3_longrope": (dict(rope_parameters={
        "full_attention": rope_parameters("longrope"), "sliding_attention": rope_parameters("default")}), None),
    "use_cache_false": (dict(use_cache=False), None),
    "tied": (dict(tie_word_embeddings=True), None),
    "untied": (dict(tie_word_embeddings=False), None),
    "window_4": (dict(sliding_window=4), None),
    "attention_bias": (dict(attention_bias=True), None),
    "partial_rotary": (dict(partial_rotary_factor=0.5), None),
    "train_mode": (dict(), "train"),
    "train_mode_dropout": (dict(attention_dropout=0.1), "train"),
    # cross-layer KV sharing (Gemma 3n / Gemma 4 small models): the last two layers read the last sliding and full layer's
    "kv_shared": (dict(num_kv_shared_layers=2, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2), None),
    "bf16": (dict(), "bfloat16"),
    "fp16": (dict(), "float16"),
}
VARIANT_ROWS = [
    *(f"llama@rope_{t}" for t in ("linear", "dynamic", "yarn", "longrope", "llama3", "proportional")),
    "qwen2@rope_longrope", "qwen3@rope_dynamic", "phi3@phi3_longrope", "gemma3_text@gemma3_longrope",
    "llama@use_cache_false", "llama@tied", "llama@untied", "mistral@window_4", "llama@attention_bias",
    "qwen3@partial_rotary", "gemma4_text@kv_shared", "llama@train_mode", "llama@train_mode_dropout", "llama@bf16", "llama@fp16",
]
# half precision: packed and alone runs round differently (other shapes, other kernels); gaps are judged
# against this many units of the dtype's eps times the logits' scale
HALF_ULPS = 8
# Variants tried in order when a build or solo run fails, before giving up.
FALLBACKS = (
    dict(),
    dict(num_key_value_heads=4),
    dict(head_dim=None),
    dict(head_dim=None, num_key_value_heads=4),
)


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def all_rows() -> list[str]:
    """Every model type, then the RoPE and config variants."""
    return model_types() + VARIANT_ROWS


# ---------------------------------------------------------------- building


def _covering_layer_types(types: list, n: int) -> list:
    """At most max(n, #kinds) layer types that keep every kind of the default pattern (a hybrid stays hybrid)."""
    if len(set(types)) <= 1 or set(types[:n]) == set(types):
        return list(types[:n])
    firsts = sorted({types.index(t) for t in set(types)})
    keep = sorted(set(firsts) | set(range(max(0, n - len(firsts)))))
    return [types[i] for i in keep]


def _shrunk_kwargs(config, extra: dict) -> dict:
    kwargs = {}
    for key, value in {**SHRINK, **extra}.items():
        if isinstance(getattr(type(config), key, None), property):
            continue  # derived from other fields (layers_block_type, head_dim, ...): set those instead
        try:
            present = hasattr(config, key)
            current = getattr(config, key, None)
        except RuntimeError:  # a per-layer attribute (Gemma 4, dots3): it has no single global value, but it is set
            present, current = True, 0
        if present and (key in extra or not isinstance(current, dict)):  # dicts (rope_parameters) only when named
            if value is None and key == "head_dim":
                kwargs[key] = None
            elif current is not None or key in extra:
                kwargs[key] = value
    vocab = kwargs.get("vocab_size", SHRINK["vocab_size"])
    for key, small in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        ids = getattr(config, key, None)  # special tokens must stay inside the shrunk vocabulary
        if isinstance(ids, int) and ids >= vocab or isinstance(ids, list) and any(i >= vocab for i in ids):
            kwargs[key] = small
    if getattr(config, "qk_rope_head_dim", None) and "head_dim" in kwargs:
        kwargs["head_dim"] = SHRINK["qk_rope_head_dim"]  # MLA configs call the RoPE part head_dim
    types = extra.get("layer_types", getattr(config, "layer_types", None))
    derived = isinstance(getattr(type(config), "layer_types", None), property) or "layer_types" in getattr(
        config, "attribute_map", {}
    )
    if isinstance(types, (list, tuple)) and types and not derived:
        kept = _covering_layer_types(list(types), kwargs.get("num_hidden_layers", 4))
        kwargs["layer_types"] = kept
        kwargs["num_hidden_layers"] = len(kept)
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            own = extra.get(key, {})  # an override may name sub-config fields: {"text_config": {...}}
            small = _shrunk_kwargs(sub, {**extra, **own})
            kwargs[key] = {**sub.to_dict(), **small, **own}
            if "num_hidden_layers" in small:  # per-layer overrides name layers of the full-size model: rebuilt from defaults
                kwargs[key].pop("per_layer_config", None)
    return kwargs


def build(model_type: str, extra: dict):
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type, _, variant = model_type.partition("@")
    config_kwargs, after = VARIANTS[variant] if variant else ({}, None)
    default = AutoConfig.for_model(CONFIG_TYPE.get(model_type, model_type), **DEFAULT_FIXES.get(model_type, {}))
    own = OVERRIDES.get(model_type, {})
    kwargs = _shrunk_kwargs(default, {**own, **extra})
    for key, value in own.items():
        kwargs.setdefault(key, value)  # a field the default config lacks (blt's num_hidden_layers)
    kwargs.update(config_kwargs)
    config = AutoConfig.for_model(CONFIG_TYPE.get(model_type, model_type), **kwargs)
    torch.manual_seed(0)
    if model_type in CONFIG_TYPE:  # the causal-LM class of a sub-config: AutoModelForCausalLM cannot map it
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        model = cls._from_config(config, dtype=torch.float32).eval()
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if after == "train":
        model.train()
    elif after:
        model.to(getattr(torch, after))
    return model


def tolerance(model, want) -> float:
    """TOL in fp32; in half precision, HALF_ULPS of the dtype's eps at the logits' scale."""
    import torch

    dtype = next(model.parameters()).dtype
    if dtype == torch.float32:
        return TOL
    return HALF_ULPS * torch.finfo(dtype).eps * float(want.abs().max())


def vocab_size(model) -> int:
    import torch

    emb = model.get_input_embeddings()
    if isinstance(emb, torch.nn.ModuleList):  # one table per codebook (MusicGen): each holds the same vocabulary
        emb = emb[0]
    return int(emb.weight.shape[0])


def prompts(model, lengths=LENGTHS):
    import torch

    g = torch.Generator().manual_seed(0)
    high = min(vocab_size(model), 512)
    return [torch.randint(3, high, (n,), generator=g) for n in lengths]


# ---------------------------------------------------------------- checking


def solo(model, seqs):
    """Each prompt alone: (N, V) last-token logits and its cache (:func:`prepack.oracle.alone`, the tests' oracle too)."""
    from prepack import oracle

    return oracle.alone(model, seqs)


def padded_generate(model, seqs, pad_id: int):
    import torch

    from prepack.jobs.generation import left_pad

    ids, mask = left_pad(seqs, pad_id, "cpu")
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=pad_id,
        )
    return out[:, ids.shape[1]:].tolist()


def alone_generate(model, seq, pad_id: int) -> list:
    """transformers alone: ``model.generate`` on this one prompt (:func:`prepack.oracle.alone_generate`)."""
    from prepack import oracle

    return oracle.alone_generate(
        model, seq, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id,
    )


def cached_generate(model, seq, pad_id: int) -> list:
    """transformers alone: prefill all but the last token into its own cache, then ``generate`` (what prepack does)."""
    import torch

    from prepack.hf.registration import cache_kwarg
    from prepack.mixers.states import new_cache

    cache = new_cache(model.config)  # the model's own cache class (MiniMax takes its MiniMaxCache only)
    with torch.no_grad():
        if len(seq) > 1:
            model(seq[None, :-1], **{cache_kwarg(model): cache}, use_cache=True)
        out = model.generate(
            seq[None], **{cache_kwarg(model): cache}, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=pad_id,
        )
    return out[0, len(seq):].tolist()


from prepack.oracle import cache_gap  # noqa: E402 - the tests' oracle, shared


def check(model_type: str) -> dict:
    """Classify one model type; never raises."""
    import torch

    torch.set_num_threads(1)
    import prepack
    from prepack.mixers import mixer_modules
    from prepack.hf.support import UnsupportedModelError

    row = {"type": model_type}
    model = seqs = None
    errors = []
    for extra in FALLBACKS:  # the first variant that builds and runs alone
        try:
            model = build(model_type, extra)
        except Exception as e:  # noqa: BLE001 - any failure to build is a finding
            errors.append(("build", e))
            model = None
            continue
        try:
            seqs = prompts(model)
            want, solo_caches = solo(model, seqs)
            break
        except Exception as e:  # noqa: BLE001
            errors.append(("solo", e))
            model = None
    if model is None:
        stage, e = next((x for x in errors if x[0] == "solo"), errors[0])  # the hand-made config's own failure
        if stage == "solo":  # it builds, and transformers alone fails on it (no prepack involved)
            return {**row, "outcome": "transformers fails", "detail": (
                f"plain transformers, no prepack: model(input_ids, use_cache=True) on the tiny config raises "
                f"{type(e).__name__}: {_short(e)}")}
        own = default_build_error(model_type)
        if own is not None:  # transformers cannot even build its own default: not our tiny config's fault
            return {**row, "outcome": "transformers fails", "detail": own}
        return {**row, "outcome": "not buildable tiny", "detail": f"{type(e).__name__}: {_short(e)}"}
    row["class"] = type(model).__name__
    row["features"] = features(model)
    details = []
    try:
        gaps = {}
        for backend in BACKENDS:
            try:
                result = prepack.prefill(model, seqs, backend=backend, token_budget=TOKEN_BUDGET)
            except UnsupportedModelError as e:
                if backend == BACKENDS[0] or not mixer_modules(model):
                    raise
                # a row backend lays prompts out under a dense mask only attention reads: refused for mixers
                row["refused_backends"] = f"{backend}: {_short(e, 120)}"
                continue
            gaps[backend] = float((result.logits.float() - want).abs().max())
            if backend == BACKENDS[0]:
                cgap = max(cache_gap(mine, theirs) for mine, theirs in zip(result.dynamic_caches, solo_caches))
        tol = tolerance(model, want)
        row["logits_gap"] = max(gaps.values())
        row["cache_gap"] = cgap
        bad = {b: g for b, g in gaps.items() if not g <= tol}
        if bad:
            details.append("logits off: " + ", ".join(f"{b} {g:.2g}" for b, g in bad.items()))
        if not cgap <= tol:
            details.append(f"cache off by {cgap:.2g}")
    except UnsupportedModelError as e:
        return {**row, "outcome": "refused", "detail": _short(e)}
    except Exception as e:  # noqa: BLE001
        return {**row, "outcome": "prepack crash", "detail": f"prefill: {type(e).__name__}: {_short(e)}",
                "trace": traceback.format_exc(limit=-6)}
    if next(model.parameters()).dtype in (torch.float16, torch.bfloat16):
        # half precision rounds packed and alone runs differently, so a greedy near-tie may flip either way:
        # exactness of tokens is a claim about fp32 (the other rows); here logits and caches are judged
        if details:
            return {**row, "outcome": "silently wrong", "detail": "; ".join(details)}
        return {**row, "outcome": "exact", "detail": "logits and caches within the half-precision tolerance; greedy tokens are checked in fp32 only"}
    pad_id = 0
    try:
        want_tokens = padded_generate(model, seqs, pad_id)
    except Exception as e:  # noqa: BLE001
        return {**row, "outcome": "transformers fails",
                "detail": f"left-padded generate: {type(e).__name__}: {_short(e)}"}
    try:
        got = prepack.generate(
            model, seqs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=pad_id, token_budget=TOKEN_BUDGET,
        )
        got = [g.tokens.tolist() for g in got]
        differ = [i for i, (a, b) in enumerate(zip(got, want_tokens)) if a != b[: len(a)] or len(a) == 0]
        row["tokens_differ"] = len(differ)
        if differ and not details and all(alone_generate(model, seqs[i], pad_id) == got[i] for i in differ):
            # each prompt generated alone agrees with prepack: the left-padded batch is what differs (its
            # frequencies follow its longest row under length-dependent RoPE)
            differ = []
            row["tokens_differ"] = 0
        if differ and not details and all(cached_generate(model, seqs[i], pad_id) == got[i] for i in differ):
            # prepack's prefill is exact (logits and caches), and transformers decoding from its own cache of
            # the same prefix gives prepack's tokens: transformers disagrees with itself, not with prepack
            return {**row, "outcome": "transformers fails", "detail": (
                f"greedy tokens of {len(differ)}/{len(seqs)} prompts: transformers' own generate from a cache of "
                "the prompt prefix differs from its one-shot generate; prepack matches the former")}
        if differ:
            details.append(f"greedy tokens differ on {len(differ)}/{len(seqs)} prompts")
    except UnsupportedModelError as e:
        if mixer_modules(model) and not details:
            return {**row, "outcome": "exact prefill", "detail": f"prefill and continued caches exact; generate: {_short(e)}"}
        return {**row, "outcome": "refused", "detail": f"generate: {_short(e)}"}
    except Exception as e:  # noqa: BLE001
        return {**row, "outcome": "prepack crash", "detail": f"generate: {type(e).__name__}: {_short(e)}",
                "trace": traceback.format_exc(limit=-6)}
    if details:
        return {**row, "outcome": "silently wrong", "detail": "; ".join(details)}
    return {**row, "outcome": "exact", "detail": ""}


def default_build_error(model_type: str) -> str | None:
    """transformers' own failure to build ``model_type`` from its default config (plain transformers:
    ``AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type))``, on the meta device, so no
    full-size weights), or None when it builds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = model_type.partition("@")[0]
    call = f"AutoConfig.for_model({model_type!r})"
    try:
        config = AutoConfig.for_model(model_type)
        call = f"AutoModelForCausalLM.from_config({call})"
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001
        return f"plain transformers, no prepack: {call} with its own defaults raises {type(e).__name__}: {_short(e)}"
    return None


def features(model) -> str:
    """The attention variants this tiny model exercises (per-layer attributes read as absent)."""
    try:
        return _features(model)
    except RuntimeError:  # AmbiguousGlobalPerLayerAttributeError: no single global value to report
        return "per-layer config"


def _features(model) -> str:
    """The attention variants this tiny model exercises, for the matrix."""
    config = model.config.get_text_config(decoder=True)
    out = []
    types = set(getattr(config, "layer_types", None) or [])
    if "sliding_attention" in types or (not types and getattr(config, "sliding_window", None)):
        out.append("sliding")
    if "chunked_attention" in types or getattr(config, "attention_chunk_size", None):
        out.append("chunked")
    if getattr(config, "attn_logit_softcapping", None):
        out.append("softcap")
    if any(n.endswith("sinks") for n, _ in model.named_parameters()):
        out.append("sinks")
    v, qk = getattr(config, "v_head_dim", None), getattr(config, "qk_nope_head_dim", None)
    if v and qk and v != qk + (getattr(config, "qk_rope_head_dim", 0) or 0):
        out.append("v dim != qk dim")
    nope = getattr(config, "no_rope_layers", None)
    if nope and not all(nope):
        out.append("NoPE layers")
    return ", ".join(out)


def _short(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- the sweep


class _Timeout(Exception):
    pass


def check_with_timeout(model_type: str, timeout: float) -> dict:
    """:func:`check` under a SIGALRM timeout, so one hang does not stall a worker's batch."""
    import signal

    def alarm(signum, frame):
        raise _Timeout

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(timeout))
    try:
        return check(model_type)
    except _Timeout:
        return {"type": model_type, "outcome": "not buildable tiny", "detail": f"timed out after {timeout:.0f} s"}
    finally:
        signal.alarm(0)


def run_batch(model_types: list[str], timeout: float) -> dict[str, dict]:
    """Check ``model_types`` in one worker process (one import of torch and transformers for the batch).

    Types the worker did not report (it crashed or hung past the batch's time) come back missing.
    """
    cmd = [sys.executable, __file__, "--timeout", str(timeout), "--one", *model_types]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * len(model_types) + 60)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.stdout or b"").decode(), (e.stderr or b"").decode(), "timeout"
    rows = {}
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["type"]] = row
    if len(model_types) == 1 and not rows:
        tail = err.strip().splitlines()[-1:] or ["no output"]
        mt = model_types[0]
        rows[mt] = {"type": mt, "outcome": "transformers fails", "detail": f"worker died ({rc}): {tail[0][:200]}"}
    return rows


def write_markdown(rows: list[dict], path: str, command: str, seconds: float) -> None:
    import torch
    import transformers

    variants = [r for r in rows if "@" in r["type"]]
    rows = [r for r in rows if "@" not in r["type"]]
    counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    summary = (
        f"{counts['exact']} exact / {counts['exact prefill']} exact prefill / {counts['refused']} refused / {counts['not buildable tiny']} not buildable tiny / "
        f"{counts['transformers fails']} transformers fails / {counts['silently wrong']} silently wrong / "
        f"{counts['prepack crash']} prepack crash (of {len(rows)} causal-LM model types)"
    )
    took = f" ({seconds / 60:.0f} min)" if seconds else ""
    lines = [
        "# Model conformance matrix",
        "",
        "Generated by `benchmarks/model_zoo.py`; do not edit by hand.",
        "",
        f"- transformers {transformers.__version__}, torch {torch.__version__}, fp32 on CPU",
        f"- command: `{command}`{took}",
        f"- prompts of lengths {LENGTHS} (window / chunk size {WINDOW}), token_budget={TOKEN_BUDGET}, "
        f"backends {', '.join(BACKENDS)}; logits and caches within {TOL:g} of each prompt run alone, "
        f"{NEW_TOKENS} greedy tokens equal to left-padded `model.generate`",
        "",
        f"**Summary: {summary}.**",
        "",
        "What **exact** covers: `prepack.prefill` (last-token logits on both CPU backends, each request's cache) and "
        "`prepack.generate` (greedy tokens), on the model as built, in fp32, eval mode. `forward_at`, `score`, "
        "`score_rolling`, `classify`, `embed` and the lm-eval backend run the same packed forward as `prefill`; they "
        "are checked in `tests/` on Llama, Qwen2, Mistral and Gemma2 (and on PEFT LoRA/IA3/LoHa, `torch.compile`'d, "
        "hooked and forward-replaced models in `tests/test_wrapped.py`, on length-dependent RoPE in "
        "`tests/test_rope.py`), not per model type here. The variant rows below cover RoPE types, config variants, "
        "train mode and half precision on the base types they name.",
        "",
        "Outcomes: **exact** (all checks pass; for a hybrid model with convolution / recurrent layers, "
        "`prepack.mixers`, the caches include each request's conv and recurrent states, `generate` holds them across "
        "steps, and the row backend `sdpa_masked` is refused: see docs/hybrid.md); **exact prefill** (such a model "
        "whose prefill and caches are exact but whose `prepack.generate` is refused with its reason); **refused** (prepack raised `UnsupportedModelError` naming the model "
        "and the reason); **not buildable tiny** (the tiny config does not build: our config's fault); **transformers "
        "fails** (plain transformers, with no prepack involved, fails: its own default config does not build, or the "
        "model run alone or left-padded `generate` raises; the detail names the call, reproducible without prepack); "
        "**silently wrong** / **prepack crash** must never appear. The tiny configs are a generic shrink of each "
        "type's default config plus hand-made per-type overrides (`benchmarks/zoo_configs.py`, each with its "
        "reason).",
        "",
        "| model type | class | features | outcome | logits gap | detail |",
        "|---|---|---|---|---|---|",
    ]
    def table(rows):
        for r in rows:
            gap = f"{r['logits_gap']:.1e}" if "logits_gap" in r else ""
            detail = r.get("detail", "").replace("|", "\\|")
            lines.append(f"| {r['type']} | {r.get('class', '')} | {r.get('features', '')} | {r['outcome']} | {gap} | {detail} |")

    table(rows)
    if variants:
        vcounts = {o: sum(r["outcome"] == o for r in variants) for o in OUTCOMES}
        lines += [
            "",
            "## RoPE and config variants",
            "",
            "`<type>@<variant>`: the tiny model of `<type>` with one change (`VARIANTS` in the script): a RoPE type "
            f"with its threshold at {ROPE_ORIG} tokens (prompts on both sides of it), `use_cache=False`, tied or untied "
            "embeddings, a window of 4 (below most prompts), attention bias, partial rotary, train mode (with and "
            "without dropout), bf16 and fp16 on CPU (judged within "
            f"{HALF_ULPS} eps of the dtype at the logits' scale: packed and alone runs round differently; greedy tokens "
            "are checked in fp32 only, since a near-tie may flip in half precision). Same checks as above otherwise.",
            "",
            "**Variants: " + " / ".join(f"{vcounts[o]} {o}" for o in OUTCOMES) + f" (of {len(variants)}).**",
            "",
            "| row | class | features | outcome | logits gap | detail |",
            "|---|---|---|---|---|---|",
        ]
        table(variants)
    text = "\n".join(lines) + "\n"
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text)
    print(summary, file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="these model types only")
    parser.add_argument("--out", default="docs/models.md", help="markdown output ('-' for stdout)")
    parser.add_argument("--jsonl", default=None, help="also append each row, as it finishes, to this file")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model type")
    parser.add_argument("--batch", type=int, default=12, help="model types per worker process")
    parser.add_argument("--from-jsonl", help="only render --out from rows a previous run wrote with --jsonl")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_jsonl:
        with open(args.from_jsonl) as f:
            rows = {r["type"]: r for r in map(json.loads, f)}  # a later row for a type replaces an earlier one
        write_markdown(sorted(rows.values(), key=lambda r: r["type"]), args.out,
                       "python benchmarks/model_zoo.py --jsonl rows.jsonl", 0.0)
        return 0
    if args.one:
        for mt in args.one:
            print(json.dumps(check_with_timeout(mt, args.timeout)), flush=True)
        return 0
    types = args.only or all_rows()
    rows, t0 = [], time.time()
    for start in range(0, len(types), args.batch):
        batch = types[start : start + args.batch]
        got = run_batch(batch, args.timeout)
        for mt in batch:
            row = got.get(mt) or run_batch([mt], args.timeout)[mt]  # a crashed batch: retry alone
            rows.append(row)
            print(f"[{len(rows)}/{len(types)}] {mt}: {row['outcome']} {row.get('detail', '')[:160]}", file=sys.stderr, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    command = "python benchmarks/model_zoo.py" + (f" --only {' '.join(args.only)}" if args.only else "")
    write_markdown(rows, args.out, command, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
