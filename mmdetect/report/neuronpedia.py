"""Explained neurons as Neuronpedia feature batches: the JSON body of Neuronpedia's ``POST /api/feature/upload-batch``.

The schema is the one its server validates (``apps/webapp/app/api/feature/upload-batch/route.tsx`` in
github.com/hijohnnylin/neuronpedia, read at commit ebb8426f) and its Python client sends
(``neuronpedia/requests/feature_request.py``, ``FeatureRequest.upload_batch``)::

    {"modelId": str, "source": str,                  # both lowercased by the server; source = "<layer>-<source set>"
     "features": [                                   # 1 to 128 features, distinct indexes
       {"index": int in [0, 10_000_000],
        "density": float in [0, 1] (optional),
        "topLogits": [{"token": str, "value": float}] (at most 20, optional),
        "bottomLogits": [{"token": str, "value": float}] (at most 20, optional),
        "activations": [                             # at least 1
          {"tokens": [str] (1 to 1024, non-empty), "values": [float] (as many as tokens),
           "quantileMax": float, "quantileMin": float, "quantileFraction": float in [0, 1]}]}]}

What mmdetect puts there, per neuron (one source per layer, as the client's source sets have):

* ``index``: the neuron's index in its layer; in a mixture-of-experts layer the experts are laid end to end in the
  order of their labels (``"0"`` < ``"1"`` < … < ``"shared"``, numbers numerically), so index = the sizes of the
  experts before it + the neuron. ``manifest.json`` lists every feature's layer, expert and neuron;
* ``density``: ``freq_pos``, the share of the corpus's tokens on which its pre-activation is positive;
* ``topLogits`` / ``bottomLogits``: the vocabulary view, the tokens its write vector promotes and suppresses (logit
  per unit activation through the final norm and the unembedding, minus the vocabulary mean), 20 each;
* ``activations``: one per top context of the corpus pass, as three text pieces (the context before, the token, the
  context after; empty pieces left out) with the activation on the token and 0 on the context pieces: the corpus
  pass keeps each neuron's top tokens, not every token's value. All of them form one quantile section: quantileMin
  and quantileMax the smallest and largest top value, quantileFraction the share of the tokens they are.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

MAX_FEATURES = 128          # per batch (the route's .max(128); the client's MAX_FEATURES_PER_BATCH)
MAX_LOGITS = 20             # topLogits / bottomLogits
MAX_TOKENS = 1024           # tokens (and values) per activation
MAX_INDEX = 10_000_000


def model_id(name: str) -> str:
    """A Neuronpedia model id from a model's name: its last path part, lowercased, runs of other characters than
    letters, digits, dots and hyphens replaced by one hyphen (``google/gemma-3-270m`` -> ``gemma-3-270m``)."""
    last = str(name).rstrip("/").split("/")[-1]
    slug = re.sub(r"[^a-z0-9.-]+", "-", last.lower()).strip("-")
    return slug or "model"


def _expert_order(label: str) -> tuple[int, float, str]:
    try:
        return 0, float(label), ""
    except ValueError:
        return 1, 0.0, label


def layer_offsets(frame: Any) -> dict[tuple[int, str], int]:
    """(layer, expert label) -> the index of its first neuron in the layer's source (0 for a dense MLP)."""
    from mmdetect.report.pagestats import expert_text

    sizes: dict[int, dict[str, int]] = {}
    for layer, expert, neuron in zip(frame["layer"].tolist(), frame["expert"].tolist(), frame["neuron"].tolist()):
        per = sizes.setdefault(int(layer), {})
        e = expert_text(expert)
        per[e] = max(per.get(e, 0), int(neuron) + 1)
    out = {}
    for layer, per in sizes.items():
        start = 0
        for e in sorted(per, key=_expert_order):
            out[(layer, e)] = start
            start += per[e]
    return out


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _logits(entries: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    if entries is None:
        return None
    out = []
    for e in entries[:MAX_LOGITS]:
        value = _finite(e.get("logit"))
        token = e.get("token")
        if value is None:
            continue
        out.append({"token": str(token) if token not in (None, "") else f"<{e.get('token_id')}>", "value": value})
    return out


def activation(entries: Sequence[Mapping[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """A neuron's top contexts as Neuronpedia activations (see the module docstring)."""
    values = [v for v in (_finite(e.get("value")) for e in entries) if v is not None]
    if not values:
        return []
    q = {"quantileMax": max(values), "quantileMin": min(values),
         "quantileFraction": min(1.0, len(values) / tokens) if tokens > 0 else None}
    out = []
    for e in entries:
        value = _finite(e.get("value"))
        if value is None:
            continue
        token = e.get("token") or f"<{e.get('token_id')}>"
        pieces = [(str(e.get("before") or ""), 0.0), (str(token), value), (str(e.get("after") or ""), 0.0)]
        pieces = [(t, v) for t, v in pieces if t][:MAX_TOKENS]
        out.append({"tokens": [t for t, _ in pieces], "values": [v for _, v in pieces], **q})
    return out


def batches(neurons: Sequence[tuple[int, Any, int]], views: Sequence[Mapping[str, Any] | None], stats: Any,
            model: str, source_set: str) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """([(file name, upload-batch body)], manifest rows) for ``neurons`` (layer, expert, neuron), their vocabulary
    views (None where there is none) and the corpus statistics. Neurons without a stats row or without any top token
    are left out (a feature needs one activation) and listed in the manifest with the reason."""
    import numpy as np

    from mmdetect.report.pagestats import expert_text

    frame, details = stats.frame, stats.details
    offsets = layer_offsets(frame)
    s_layer, s_neuron = frame["layer"].to_numpy(), frame["neuron"].to_numpy()
    s_expert = np.array([expert_text(v) for v in frame["expert"].tolist()], dtype=object)
    per_source: dict[str, list[dict[str, Any]]] = {}
    manifest = []
    for (layer, expert, neuron), view in zip(neurons, views):
        e = expert_text(expert)
        source = f"{int(layer)}-{source_set}".lower()
        row = {"layer": int(layer), "expert": e or None, "neuron": int(neuron), "source": source}
        hit = np.flatnonzero((s_layer == layer) & (s_neuron == neuron) & (s_expert == e))
        if not hit.size:
            manifest.append({**row, "left_out": "no corpus statistics for this neuron"})
            continue
        i = int(hit[0])
        acts = activation(details["top"][i] or [], int(frame["tokens"].iloc[i]))
        if not acts:
            manifest.append({**row, "left_out": "no top token in the corpus pass"})
            continue
        index = offsets[(int(layer), e)] + int(neuron)
        feature: dict[str, Any] = {"index": index}
        density = _finite(frame["freq_pos"].iloc[i])
        if density is not None:
            feature["density"] = density
        feature["topLogits"] = _logits(view.get("promotes")) if view else None
        feature["bottomLogits"] = _logits(view.get("suppresses")) if view else None
        feature["activations"] = acts
        per_source.setdefault(source, []).append(feature)
        manifest.append({**row, "index": index})
    files = []
    mid = model.lower()
    for source in sorted(per_source, key=lambda s: int(s.split("-", 1)[0])):
        feats = per_source[source]
        for k in range(0, len(feats), MAX_FEATURES):
            name = f"{source}.{k // MAX_FEATURES:03d}.json"
            files.append((name, {"modelId": mid, "source": source, "features": feats[k:k + MAX_FEATURES]}))
            for m in manifest:
                if m.get("source") == source and "index" in m and any(f["index"] == m["index"]
                                                                      for f in feats[k:k + MAX_FEATURES]):
                    m["file"] = name
    return files, manifest
