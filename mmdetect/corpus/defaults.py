"""The corpus pass's defaults, in a module that imports nothing (the CLI shows them in --help without torch)."""
from __future__ import annotations

DEFAULT_MAX_TOKENS = 4_096        # about 35 s on the default model (Gemma 3 270M GGUF), 2-core CPU, load included
DEFAULT_SEQ_LEN = 512
BATCH_TOKENS = 4096               # tokens per forward pass (whole windows of one length)
TOP_K = 20                        # top tokens by post-activation kept per neuron (the companion file)
