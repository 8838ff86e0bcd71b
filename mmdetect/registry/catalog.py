"""What the registry covers, as rows: one per model type and MLP, with whether its attention heads are available.

``mmdetect archs`` prints these rows; the ``heads`` and ``heads_reason`` columns make the attention coverage gap
visible per model type.
"""
from __future__ import annotations

from typing import Any

from mmdetect.registry.loader import load_registry


def archs_rows(fmt: str = "safetensors") -> list[dict[str, Any]]:
    """One row per (model type, MLP) of format ``fmt``, sorted: the MLP layout of the type's default config, then
    ``heads`` (an attention layout is registered) and ``heads_reason`` (why not; None when it is)."""
    rows = []
    for fam in load_registry().families:
        if fam.format != fmt:
            continue
        for model_type in fam.model_types:
            resolved = fam.resolve({"model_type": model_type})
            for spec in fam.mlps:
                rows.append({
                    "model_type": model_type, "family": fam.family, "mlp": spec.name,
                    "gated": spec.gated, "experts": spec.experts,
                    "tensors": ", ".join(f"{role}={ts.key.split('{i}.')[-1]}" for role, ts in spec.tensors().items()),
                    "pre_norm": spec.pre_norm.kind if spec.pre_norm else "none",
                    "post_norm": spec.post_norm.kind if spec.post_norm else "",
                    "variants": sum(v.mlps is not None for v in fam.variants),
                    "heads": resolved.attention is not None,
                    "heads_reason": resolved.attention_gap,
                })
    rows.sort(key=lambda r: (r["model_type"], r["mlp"]))
    return rows


def refused() -> dict[str, str]:
    """Model types whose MLPs are not supported, with the reason."""
    return dict(load_registry().refused)
