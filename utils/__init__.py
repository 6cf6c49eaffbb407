"""draftplus's modules, one job each (the README's table lists them)."""

import logging

# diffusers and peft import bitsandbytes for their quantizers; on some CPUs it then warns about a 4-bit
# kernel package this project never uses. Silenced here, before any of them is imported, so that the
# first lines a run prints are about the run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
