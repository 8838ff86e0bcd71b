"""``scan --verify``: for the top flagged rows of a scan, the deletion score on text and the top upstream writer.

``verify`` returns a new DataFrame (the scan's rows and attrs plus ``VERIFY_COLUMNS``); the scan's own frame is left
as it was. Rows beyond the top ``k`` flagged ones get NaN / None in the new columns.
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmdetect.analysis.circuit import open_circuit
from mmdetect.analysis.evidence import evidence, load_hf_model, stats_evidence, vocab_size_from_config
from mmdetect.analysis.targets import find_targets
from mmdetect.analysis.writers import upstream_writers
from mmdetect.convention import DEFAULT
from mmdetect.corpus.activations import Result
from mmdetect.corpus.sources import resolve_source
from mmdetect.corpus.vocab import load_vocab
from mmdetect.errors import MMDetectError, warn

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

VERIFY_COLUMNS = ["deletion", "top_writer", "writer_score", "writer_cos"]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def verify_columns(df: Any, model: str, k: int, *, revision: str | None = None, convention: str = DEFAULT,
                   text: str | None = None, dataset: str | None = None, field_name: str = "text",
                   max_tokens: int = 4096, seq_len: int = 128,
                   stats: Result | None = None) -> tuple[Any, dict[str, Any]]:
    """The ``VERIFY_COLUMNS`` of a scan DataFrame (same index) and what was verified ({"k", "verified", "corpus" or
    "skipped"}): the deletion score and top upstream writer of its top ``k`` flagged rows. With ``stats`` (the
    result of the corpus pass, ``scan --activations``) the deletion score is its ``deletion`` column, the same
    number the pass gives here on the same corpus, and the model is not run."""
    import pandas as pd

    flagged = df.index[df["flagged"].to_numpy(dtype=bool)][:k]
    cols = pd.DataFrame({"deletion": np.nan, "top_writer": pd.Series(None, index=df.index, dtype=object),
                         "writer_score": np.nan, "writer_cos": np.nan}, index=df.index)
    info: dict[str, Any] = {"k": int(k), "verified": int(len(flagged))}
    if not len(flagged):
        return cols, info
    if stats is None:
        resolve_source(text, dataset, field_name)  # a bad corpus fails before the checkpoint is opened
    rows = [(int(df.at[i, "layer"]), None if _missing(df.at[i, "expert"]) else df.at[i, "expert"],
             int(df.at[i, "neuron"])) for i in flagged]
    with open_circuit(model, revision=revision, convention=convention) as circuit:
        targets = find_targets(circuit, rows)
        vocab = load_vocab(circuit.ckpt, circuit.vocab_size() if circuit.attention is not None
                           else vocab_size_from_config(circuit))
        writers = upstream_writers(circuit, torch.stack([t.r for t in targets]), [t.layer for t in targets],
                                   k=1, vocab=vocab)
        if stats is not None:
            ev = stats_evidence(stats, rows)
            info["corpus"] = f"activations: {stats.provenance.options.get('corpus')}"
        else:
            corpus = resolve_source(text, dataset, field_name)
            try:
                ev = evidence(circuit, targets, corpus, vocab, max_tokens=max_tokens, seq_len=seq_len, n_contexts=0,
                              model=load_hf_model(circuit))
                info["corpus"] = corpus.description
            except MMDetectError as exc:
                if text or dataset:
                    raise
                warn(f"no deletion scores: {exc}")
                ev = [{"skipped": str(exc)}] * len(targets)
                info["skipped"] = str(exc)
    for i, w, e in zip(flagged, writers, ev):
        if w["top"]:
            best = w["top"][0]
            cols.at[i, "top_writer"] = best["label"]
            cols.at[i, "writer_score"] = best["score"]
            cols.at[i, "writer_cos"] = best.get("cos", np.nan)
        if "deletion" in e:
            cols.at[i, "deletion"] = e["deletion"]["score"]
    return cols, info


def verify(df: pd.DataFrame, model: str, k: int, **options: Any) -> pd.DataFrame:
    """A new DataFrame: ``df``'s rows and attrs with the ``VERIFY_COLUMNS`` of its top ``k`` flagged rows added, and
    ``attrs["provenance"]["options"]["verify"]`` recording the corpus and how many rows. ``options``: see
    ``verify_columns``.
    ``df`` itself is not changed."""
    cols, info = verify_columns(df, model, k, **options)
    out = df.drop(columns=[c for c in VERIFY_COLUMNS if c in df.columns]).join(cols)
    out.attrs = copy.deepcopy(df.attrs)
    out.attrs.setdefault("provenance", {}).setdefault("options", {})["verify"] = info
    return out
