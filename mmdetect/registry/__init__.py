"""The architecture registry: data, not code.

Each ``families/*.yaml`` file describes one family of model types in ONE schema: where every MLP of a layer stores
its tensors (and which axis indexes the neurons), the attention layout (q/k/v or fused qkv, o, the head-count config
keys, the norms around it, whether the block is parallel) or the reason heads are not available, and the embedding,
unembedding and final norm, and (``transformerlens``) what TransformerLens's adapter for a model type leaves
unprocessed. Config switches are ``variants`` (``when`` -> the fields they replace; every matching
variant applies, in file order). ``docs/architectures.md`` documents every field and how to add an architecture.

* :mod:`.schema` — the typed records (:class:`Family`, :class:`MLPSpec`, :class:`AttentionLayout`, ...) and
  :func:`tensor_key`, the one way to fill in a key template;
* :mod:`.loader` — the one strict loader (an unknown key is an error naming the file and the path);
* :mod:`.resolve` — which family applies to a checkpoint, where its MLPs and heads are (one prefix-rebasing rule);
* :mod:`.catalog` — the rows ``mmdetect archs`` prints;
* :mod:`.heuristic` — a header-only guess for model types the registry does not know.
"""
from __future__ import annotations

from mmdetect.registry.loader import HERE, find_family, load_registry, parse_family
from mmdetect.registry.schema import (
                                      EXPERT_KINDS,
                                      FORMATS,
                                      NORM_KINDS,
                                      AttentionLayout,
                                      Family,
                                      MLPSpec,
                                      NormSpec,
                                      Processing,
                                      Proj,
                                      Registry,
                                      RegistryError,
                                      Resolved,
                                      TensorSpec,
                                      Variant,
                                      key_pattern,
                                      tensor_key,
)

__all__ = ["EXPERT_KINDS", "FORMATS", "HERE", "NORM_KINDS", "AttentionLayout", "Family", "MLPSpec", "NormSpec",
           "Processing", "Proj", "Registry", "RegistryError", "Resolved", "TensorSpec", "Variant", "find_family",
           "key_pattern", "load_registry", "parse_family", "tensor_key"]
