"""``prepack bench``: time padded, length-sorted and packed prefill on the same prompts, in one run.

One module per step, so that scripts and the CLI (``prepack/cli/commands.py``) share them::

    from prepack.bench import build_model, format_table, load_prompts, run_bench

    model = build_model("llama-small")                                          # models
    prompts = load_prompts("sharegpt", 32, vocab_size=model.config.vocab_size)  # prompts
    rows = run_bench(model, prompts.token_ids, metrics=("prefill",))            # methods, measure
    print(format_table(rows))                                                   # report

* :mod:`~prepack.bench.models`: presets with random weights, or a local checkpoint;
* :mod:`~prepack.bench.prompts`: ShareGPT, synthetic lengths, JSONL/text files -> a :class:`PromptSet`;
* :mod:`~prepack.bench.methods`: ``padded``, ``sorted``, ``prepack``, ``prepack:<backend>``, ...;
* :mod:`~prepack.bench.measure`: time per call, the agreement check, ``run_bench``, ``run_sweep``;
* :mod:`~prepack.bench.memory`: peak memory per call (CUDA allocator peak, or sampled RSS on CPU);
* :mod:`~prepack.bench.report`: the markdown table and the PNG.

Heavy optional imports (tqdm, matplotlib, transformers, tiktoken) happen inside
functions, so importing this package costs little more than ``import prepack``.
"""

from .measure import (
    DEFAULT_BATCH_SIZES,
    BenchMismatch,
    check_agreement,
    check_batch_sizes,
    count_calls,
    iter_sweep,
    measure_memory,
    run_bench,
    run_sweep,
    time_call,
    time_interleaved,
)
from .memory import MemoryMeter
from .methods import (
    DEFAULT_METHODS,
    METHOD_FNS,
    METHODS,
    METRICS,
    SORTED_MICRO_BATCH,
    SUPPORTS,
    Call,
    Outcome,
    check_method,
    computed_tokens,
    method_fn,
    supports,
)
from .models import DTYPES, PRESETS, build_model, preset_config
from .prompts import PromptSet, load_prompts, read_jsonl, sample_lengths
from .report import format_speedups, format_table, plot_results

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_METHODS",
    "DTYPES",
    "METHODS",
    "METHOD_FNS",
    "METRICS",
    "PRESETS",
    "SORTED_MICRO_BATCH",
    "SUPPORTS",
    "BenchMismatch",
    "Call",
    "MemoryMeter",
    "Outcome",
    "PromptSet",
    "build_model",
    "check_agreement",
    "check_batch_sizes",
    "check_method",
    "computed_tokens",
    "count_calls",
    "format_speedups",
    "format_table",
    "iter_sweep",
    "load_prompts",
    "method_fn",
    "plot_results",
    "preset_config",
    "read_jsonl",
    "run_bench",
    "run_sweep",
    "sample_lengths",
    "supports",
    "measure_memory",
    "time_call",
    "time_interleaved",
]
