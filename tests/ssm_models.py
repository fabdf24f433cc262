"""Tiny random-weight state-space models (Mamba2 family, Zamba) from ``benchmarks/model_zoo.py``'s shrunk configs.

SSD chunk sizes are set below the tests' longer prompts, so a prompt spans several chunks.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model_zoo  # noqa: E402

CHUNKED = {
    "mamba2": {"chunk_size": 4},
    "bamba": {"mamba_chunk_size": 4},
    "nemotron_h": {"chunk_size": 4},
    "falcon_h1": {"mamba_chunk_size": 4},
    "granitemoehybrid": {"mamba_chunk_size": 4},
    "zamba2": {"chunk_size": 4},
}
# every state-space type prepack packs: the Mamba2 family (one call), Zamba, Jamba, Mamba and FalconMamba (per segment)
MAMBA1_TYPES = ("mamba", "falcon_mamba")
SSM_TYPES = (*CHUNKED, "zamba", "jamba", *MAMBA1_TYPES)


def build_ssm(model_type: str, **extra):
    """A tiny fp32 ``model_type`` model in eval mode, seeded weights (model_zoo's shrink plus small SSD chunks)."""
    return model_zoo.build(model_type, {**CHUNKED.get(model_type, {}), **extra})


def random_prompts(lengths, seed: int = 0, vocab: int = 500) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
