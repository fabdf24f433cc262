"""prepack's conv and scan on transformers' per-instance Mamba2 hooks: one packed call equals each segment alone.

The oracle is the mixer's own forward (transformers' modeling code, torch path) run on each segment's
hidden states alone; a call without ``seq_idx`` must be the modeling file's own computation.
"""

import pytest
import torch

from prepack.mixers import mamba as mamba_hooks, ssm

from .ssm_models import CHUNKED as MAMBA2_FAMILY  # chunk sizes below the longer segments': several SSD chunks each
from .ssm_models import model_zoo

LENGTHS = [7, 1, 3, 12, 2]


def _mixers(model):
    return [m for m in model.modules() if mamba_hooks.hook_funcs(m) is not None]


@pytest.mark.parametrize("model_type", sorted(MAMBA2_FAMILY))
def test_packed_mixer_call_with_seq_idx_equals_each_segment_alone(model_type):
    model = model_zoo.build(model_type, MAMBA2_FAMILY[model_type])
    mixers = _mixers(model)
    assert mixers and all(mamba_hooks.install(m) for m in mixers)
    mixer = mixers[0]
    assert mixer.chunk_size == 4
    hidden = torch.randn(1, sum(LENGTHS), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = mixer(hidden, seq_idx=ssm.seq_idx(LENGTHS, "cpu"))
        alone = torch.cat([mixer(h) for h in torch.split(hidden, LENGTHS, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_a_call_without_seq_idx_runs_the_modeling_files_own_code():
    hooked, plain = model_zoo.build("mamba2", MAMBA2_FAMILY["mamba2"]), model_zoo.build("mamba2", MAMBA2_FAMILY["mamba2"])
    assert all(mamba_hooks.install(m) for m in _mixers(hooked))
    assert all(mamba_hooks.installed(m) for m in _mixers(hooked)) and not any(mamba_hooks.installed(m) for m in _mixers(plain))
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hooked(ids).logits, plain(ids).logits, atol=0, rtol=0)
        # and the packed prompts, run plainly, do leak into each other: the hook is what keeps them apart
        packed = hooked(ids.reshape(1, -1), use_cache=False, seq_idx=ssm.seq_idx([9, 9], "cpu")).logits
        torch.testing.assert_close(packed.reshape(2, 9, -1), plain(ids).logits, atol=1e-5, rtol=1e-5)
        assert (plain(ids.reshape(1, -1)).logits.reshape(2, 9, -1)[1] - plain(ids).logits[1]).abs().max() > 1e-3


def test_install_is_idempotent_and_refuses_hooks_someone_else_replaced():
    from prepack.hf.support import UnsupportedModelError

    model = model_zoo.build("mamba2", MAMBA2_FAMILY["mamba2"])
    first, second = _mixers(model)[:2]
    assert mamba_hooks.install(first) and mamba_hooks.install(first) and mamba_hooks.installed(first)
    funcs = mamba_hooks.hook_funcs(second)
    funcs[mamba_hooks.SCAN_HOOK].forward = lambda *a, **k: None  # what kernelize does with a hub kernel
    with pytest.raises(UnsupportedModelError, match="mamba2_scan_forward hook replaced already"):
        mamba_hooks.install(second)
    assert not mamba_hooks.installed(second) and "forward" not in funcs[mamba_hooks.CONV_HOOK].__dict__


def test_a_packed_call_with_one_cache_for_all_segments_is_refused():
    from transformers import DynamicCache

    model = model_zoo.build("mamba2", MAMBA2_FAMILY["mamba2"])
    assert all(mamba_hooks.install(m) for m in _mixers(model))
    ids = torch.randint(3, 500, (1, 10))
    with torch.no_grad(), pytest.raises(ValueError, match="both a cache and seq_idx"):
        model(ids, cache=DynamicCache(config=model.config), use_cache=True, seq_idx=ssm.seq_idx([4, 6], "cpu"))
