import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

def gpu(test):
    """A CUDA-only test: the ``gpu`` marker pyproject.toml registers (``pytest -m gpu`` selects them), skipped without a GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def pytest_collection_modifyitems(items):
    """Refuse a test that runs on CUDA without the gpu marker (it would fail, not skip, on a CPU-only machine)."""
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        if fn is None or item.get_closest_marker("gpu"):
            continue
        source = inspect.getsource(fn)
        if 'device="cuda"' in source and "cuda_machine" not in getattr(item, "fixturenames", ()) and "pytest.raises" not in source:
            raise pytest.UsageError(f"{item.nodeid} runs on CUDA but has no gpu marker (use tests.conftest.gpu)")


def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True
