"""The former home of c3a's analysis tools, kept for one release so that ``from c3a.analysis import ...`` still
works: every public name it had, re-exported from where it lives now.

- exact rank and spectrum of ΔW: :mod:`c3a.rank`
- reading adapters (folders, hub ids, models): :mod:`c3a.adapters`
- export to a PEFT LoRA adapter: :mod:`c3a.export`
- block-size advice (``block_size="auto"``): :mod:`c3a.blocksize`
- parameter counts of any method with Table 1's terms: :mod:`c3a.experiments.params`

Nothing in the library imports this module (``tests/test_package_layout.py``): like the command-line modules it
sits on top of both the library and the experiments.
"""

from c3a.adapters import KERNEL_SUFFIX, PREFIX, adapter_kernels, load_adapter
from c3a.blocksize import (
    DEFAULT_LORA_RANK, BlockSizeChoice, as_block_size_config, choose_block_sizes, suggest_block_size, target_shapes,
)
from c3a.experiments.params import COMPLEXITY, HEAD_MODULES, PAPER, Complexity, ParamReport, count_parameters
from c3a.export import LORA_BIAS, LoraExport, LowRank, low_rank_factors, to_lora
from c3a.rank import LayerRank, adapter_ranks, delta_rank, delta_singular_values, layer_rank, lora_layer_ranks

__all__ = [
    "COMPLEXITY", "DEFAULT_LORA_RANK", "HEAD_MODULES", "KERNEL_SUFFIX", "LORA_BIAS", "PAPER", "PREFIX",
    "BlockSizeChoice", "Complexity", "LayerRank", "LoraExport", "LowRank", "ParamReport", "adapter_kernels",
    "adapter_ranks", "as_block_size_config", "choose_block_sizes", "count_parameters", "delta_rank",
    "delta_singular_values", "layer_rank", "load_adapter", "lora_layer_ranks", "low_rank_factors",
    "suggest_block_size", "target_shapes", "to_lora",
]
