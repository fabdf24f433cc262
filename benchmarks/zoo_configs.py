"""Hand-made tiny configs for the model types that ``model_zoo.py``'s generic shrink cannot build or run.

Data only: ``model_zoo.build`` reads these tables. Each entry says, in its comment, why the generic shrink
(``SHRINK`` in ``model_zoo.py``: set every field the default config has to a tiny value) missed it. An override
value for a sub-config (``text_config``, ``attn_config``, ...) is a dict of that sub-config's fields.
"""

from __future__ import annotations

_GEMMA4_ASSISTANT_TEXT = dict(  # a drafter's text config, as its config validator demands
    hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, enable_moe_block=False, use_double_wide_mlp=False,
)
# Where the generic shrink fails, per type: the smallest change that builds and runs.
OVERRIDES: dict[str, dict] = {
    # MLA expands keys to every query head
    # the default leaves num_experts_per_tok unset (None): the router's topk needs it
    "deepseek_v2": dict(num_key_value_heads=4, num_experts_per_tok=2),
    # the default config has head_dim=None, and the attention reads getattr(config, "head_dim", ...) -> None
    "hunyuan_v1_dense": dict(head_dim=16),
    "hunyuan_v1_moe": dict(head_dim=16),
    "ministral": dict(head_dim=16),
    # hidden_size * expand = num_heads * head_dim (128 = 8 * 16)
    "mamba2": dict(num_heads=8),
    "falcon_h1": dict(mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16),
    # one attention type per layer: [[["global", "local"], 2]] covers the 4 layers
    "gpt_neo": dict(attention_types=[[["global", "local"], 2]]),
    "zamba2": dict(layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"]),
    # the shared transformer block is tied across hybrid layers: tying needs two of them (the default's one
    # hybrid layer in 4 has nothing to tie to)
    "zamba": dict(layers_block_type=["mamba", "hybrid", "mamba", "hybrid"]),
    # KV shared across layers: every layer type that reads a shared cache must also have a layer that writes one
    # (the shrink keeps [sliding, sliding, full], whose one shared layer is the only full one); sparsity per layer
    "gemma3n": dict(layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                    activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
    "gemma3n_text": dict(layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                         activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
    # a drafter: every layer reads the KV of its target model, so all 4 tiny layers are shared
    "gemma4_assistant": dict(text_config=dict(
        **_GEMMA4_ASSISTANT_TEXT, num_kv_shared_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)),
    "gemma4_unified_assistant": dict(text_config=dict(
        num_kv_shared_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)),
    # index_num_heads must divide into the query heads of one key head (4 / 2); a layer pattern with two indexed layers
    # (the second reads the first's keys and values) and index sizes below the prompts' lengths
    "kolibri1_1": dict(index_num_heads=2, layer_types=["sliding_attention", "indexed_attention"] * 2, index_topk=4,
                       index_pool_size=16, index_compression=4, index_num_local_tokens=2, index_num_sink_tokens=1),
    "zaya": dict(num_experts_per_tok=1),  # its config validator accepts no other value
    # ReformerModelWithLMHead asserts is_decoder; the axial position embeddings' dims sum to hidden_size and
    # their shape multiplies to max_position_embeddings (the shrink leaves (64, 192) and (64, 64))
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=[32, 32], axial_pos_shape=[16, 16]),
    # MoE sizes left unset (None) in the default config
    "dots1": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2),
    # its validator wants as many KV heads as query heads; the derived per-layer MLP kinds of the full-size
    # model (46 text, 42 vision layers) are recomputed for 4 layers, and the adapters follow the tiny widths
    "dots3_note": dict(
        num_key_value_heads=4, text_config=dict(mlp_layer_types=None),
        vision_config=dict(mlp_layer_types=["dense"] * 4, adapter_in_dim=64, adapter_out_dim=64),
        audio_config=dict(adapter_input_size=64, adapter_out_dim=64),
    ),
    # the sparse indexer's sizes are unset in the default config
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=2),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=2),
    "deepseek_v3": dict(num_key_value_heads=4),
    "longcat_flash": dict(num_key_value_heads=4),
    "glm4_moe_lite": dict(num_key_value_heads=4),
    "minicpm3": dict(num_key_value_heads=4),
    # the default configs are all attention; the released models put short convolutions in between
    "lfm2": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    # the default puts the first attention layer at index 4
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    # the defaults are all Mamba (the released models put attention layers in between), and a cache without an
    # attention layer cannot tell its length (get_seq_length), so transformers' generate fails on them
    "bamba": dict(attn_layer_indices=[1, 3]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba", "attention"]),
    # DbrxAttentionConfig declares no rope_theta, yet the attention reads attn_config.rope_theta; clip_qkv=None
    # (the default) reaches torch.clamp(min=None, max=None); the released models set both
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
    # the default's empty rope_parameters has no entry per layer type; RoPE on the sliding layers, none on the full
    # ones (as Cohere2), with an mrope section that fits the tiny head_dim (16 / 2 = 4 + 2 + 2)
    "cohere_compass_text": dict(
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2]),
                         "full_attention": None},
    ),
    # BltConfig declares no num_hidden_layers, yet its DynamicCache reads one; the encoder and decoder project
    # from the global model's width (hidden_size_global), which the shrink does not know; a tiny hash vocabulary
    "blt": dict(num_hidden_layers=4, encoder_hash_byte_group_vocab=512,
                encoder_config=dict(hidden_size_global=64), decoder_config=dict(hidden_size_global=64)),
    # the input / recurrent / output layer counts (16 / 40 / 16) must sum to the 4 tiny layers
    "dory": dict(layer_types=["sliding_attention", "full_attention"] * 2, n_input_layers=1, n_recurrent_layers=2,
                 n_output_layers=1),
    # the config rounds the query/key width up to a multiple of 64 for the cache, the layer does not:
    # 128 * 0.5 = 64 makes the two agree (at hidden_size 64 the state is 16 wide and the layer's 8)
    "xlstm": dict(hidden_size=128, embedding_dim=128),
    # an adapter per language: the model refuses to run until one is chosen (the config's only language)
    "xmod": dict(default_language="en_XX"),
    # one codebook: prompts are plain token rows (with 4, each row would be 4 rows of codes)
    "musicgen": dict(num_codebooks=1),
    "musicgen_melody": dict(num_codebooks=1),
}
# Types whose causal-LM class takes a sub-config, not the type's own config: the config type to shrink instead.
CONFIG_TYPE: dict[str, str] = {
    # MusicgenForCausalLM is the decoder alone (MusicgenConfig is the text encoder + audio codec + decoder)
    "musicgen": "musicgen_decoder",
    "musicgen_melody": "musicgen_melody_decoder",
}
# Fields without which transformers' own default config does not validate, passed when it is first built
# (the shrink starts from it).
DEFAULT_FIXES: dict[str, dict] = {
    # its default text config is Gemma 4's, with per-layer inputs the assistant's validator forbids
    "gemma4_assistant": dict(text_config=_GEMMA4_ASSISTANT_TEXT),
}
