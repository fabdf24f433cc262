"""prepack.data.training: a model that would mix the sequences of padding-free packed rows is refused by name.

The oracle is each sequence run alone through the plain model.
"""

import numpy as np
import pytest
import torch
from transformers import (
    BioGptConfig,
    BioGptForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Trainer,
    TrainingArguments,
    XGLMConfig,
    XGLMForCausalLM,
)

import prepack
from prepack import DataCollatorForPackedRows, PackedTrainingCallback, check_packed_training
from prepack.hf.registration import cu_seqlens_from_position_ids

from .models import build

SMALL = dict(vocab_size=128, max_position_embeddings=64)
MIXERS = {
    "opt": lambda: OPTForCausalLM(OPTConfig(
        **SMALL, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32)),
    "biogpt": lambda: BioGptForCausalLM(BioGptConfig(
        **SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)),
    "xglm": lambda: XGLMForCausalLM(XGLMConfig(
        **SMALL, d_model=32, ffn_dim=64, num_layers=2, attention_heads=2)),
}


def rows_of(seqs_per_row):
    """Packed lean rows, one per list of sequences."""
    return [{"input_ids": [t for s in row for t in s], "seq_lengths": [len(s) for s in row]} for row in seqs_per_row]


def token_rows(lengths_per_row, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.integers(3, 100, n).tolist() for n in row] for row in lengths_per_row]


def packed_gap(model, seqs_per_row, rows=None):
    """Largest |logit| gap between each packed sequence and the same sequence alone through the plain model."""
    batch = DataCollatorForPackedRows()(rows or rows_of(seqs_per_row))
    batch.pop("labels")
    seqs = [s for row in seqs_per_row for s in row]
    with torch.no_grad():
        packed = torch.split(model(**batch).logits[0], [len(s) for s in seqs])
        alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in seqs]
    return max(float((p - a).abs().max()) for p, a in zip(packed, alone))


@pytest.mark.parametrize("kind", sorted(MIXERS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decoders_whose_mask_ignores_position_ids_mix_packed_rows_and_are_refused(kind, attn):
    torch.manual_seed(0)
    model = MIXERS[kind]().eval()
    model.set_attn_implementation(attn)  # XGLM cannot switch (it predates AttentionInterface): it stays on eager
    assert packed_gap(model, token_rows([[3, 1, 5], [4, 2]])) > 1e-3  # the peer shows the mixing
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match=rf"\(model_type '{kind}'\) on attn_implementation '{impl}' lets the sequences"):
        check_packed_training(model)


@pytest.mark.parametrize("kind", ["opt", "biogpt"])
def test_opt_and_biogpt_on_prepack_attention_keep_packed_rows_apart_and_pass_the_check(kind):
    torch.manual_seed(0)
    model = MIXERS[kind]().eval()
    model.set_attn_implementation(prepack.ATTN_IMPLEMENTATION)
    assert packed_gap(model, token_rows([[3, 1, 5], [4, 2]])) < 1e-4
    check_packed_training(model)


def test_the_refusal_names_the_implementation_that_would_train_exactly():
    model = MIXERS["opt"]()
    with pytest.raises(ValueError, match=r"train it with model.set_attn_implementation\('prepack'\)"):
        check_packed_training(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager", prepack.ATTN_IMPLEMENTATION, "prepack|eager"])
def test_llama_keeps_packed_rows_apart_on_every_implementation_and_passes_the_check(attn):
    model = build("llama")
    model.set_attn_implementation(attn)
    assert packed_gap(model, token_rows([[3, 1, 5], [4, 2]])) < 1e-4
    check_packed_training(model)


def test_a_model_type_the_sweep_never_ran_is_refused_as_not_known_to_keep_rows_apart():
    model = build("llama")
    model.config.model_type = "my_remote_code_llama"
    with pytest.raises(ValueError, match="'my_remote_code_llama'.*is not known to keep the sequences"):
        check_packed_training(model)


@pytest.mark.parametrize("attn", ["sdpa", prepack.ATTN_IMPLEMENTATION])
def test_one_token_segments_stay_sequences_of_their_own(attn):
    model = build("llama")
    model.set_attn_implementation(attn)
    seqs = token_rows([[1, 1, 4, 1], [1], [2, 1, 1]])
    assert packed_gap(model, seqs) < 1e-4


@pytest.mark.parametrize("attn", ["sdpa", prepack.ATTN_IMPLEMENTATION])
def test_full_rows_with_restarting_2d_positions_and_one_token_segments_match_each_sequence_alone(attn):
    # schema="full" through Trainer(remove_unused_columns=True): only position_ids say where sequences start
    model = build("llama")
    model.set_attn_implementation(attn)
    seqs = token_rows([[1, 3, 1, 1], [2, 1]])
    rows = [
        {"input_ids": [t for s in row for t in s], "position_ids": [p for s in row for p in range(len(s))]}
        for row in seqs
    ]
    assert packed_gap(model, seqs, rows) < 1e-4


def test_consecutive_zero_positions_are_one_token_sequences():
    pos = torch.tensor([[0, 0, 1, 2, 0, 0, 0, 1]])
    assert cu_seqlens_from_position_ids(pos, 1, 8).tolist() == [0, 1, 4, 5, 6, 8]


def test_3d_mrope_models_pass_on_prepack_attention_and_are_refused_on_their_own_sdpa():
    from .vision_models import qwen_model

    model = qwen_model("qwen2_vl")
    model.set_attn_implementation(prepack.ATTN_IMPLEMENTATION)
    check_packed_training(model)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="'qwen2_vl'"):
        check_packed_training(model)


def test_trainer_with_the_callback_stops_before_its_first_step_on_a_mixing_model(tmp_path):
    model = MIXERS["biogpt"]()
    rows = rows_of(token_rows([[3, 1, 5], [4, 2]]))
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, remove_unused_columns=False,
                             report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorForPackedRows(),
                      callbacks=[PackedTrainingCallback()])
    with pytest.raises(ValueError, match="BioGptForCausalLM"):
        trainer.train()
    assert trainer.state.global_step == 0
