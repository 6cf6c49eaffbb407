"""The memory estimator: the peak GPU memory of one training step, from the model's configs, without a GPU.

`trace` counts live tensor storages by part; `fake` makes tensors without data; `build` builds a pipeline from
its configs; `step` runs one training step under the tracker; `parts` computes what cannot be traced (bitsandbytes);
`estimate` puts them together for a command line; `report` prints the result. `train_draftplus.py
--estimate_memory` is the entry point; docs/memory.md tells how it works and how close it lands.
"""

from utils.memory.estimate import MemoryEstimate, estimate_memory
from utils.memory.report import render

__all__ = ["MemoryEstimate", "estimate_memory", "render"]
