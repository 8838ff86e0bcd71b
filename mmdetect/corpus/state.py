"""The saved state of a corpus pass: every site's running sums in one safetensors file, with what made them.

A state is written atomically (a temporary file beside it, then a rename), every few minutes during a run, when it is
stopped (Ctrl-C) and when it ends; ``mmdetect activations`` continues from a partial one and ``merge-activations``
adds complete ones. Its metadata (``__metadata__``, JSON under one key) names the inputs: the model's fingerprint,
the corpus digest, the options that change a number, the shard. A state made from other inputs is refused with one
line naming what differs; one that is truncated or whose tensors do not hash to the recorded digest is refused as
corrupt. Nothing in it is executed: safetensors holds tensors only.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmdetect.corpus.hooks import Site
from mmdetect.corpus.stats import Moments
from mmdetect.errors import CorruptInputError, MMDetectError
from mmdetect.io.output import atomic_write
from mmdetect.io.paths import open_regular

FORMAT = "mmdetect-activations-state/1"
MAX_STATE_BYTES = 64 << 30


@dataclass
class State:
    identity: dict[str, Any]        # what the numbers depend on (a resumed or merged state must match)
    windows: int                    # windows of this shard already counted
    complete: bool
    sites: list[dict[str, Any]]     # layer, expert, spec, n, gated: the order of the tensors
    moments: list[Moments]
    w_along: list[torch.Tensor]     # per site [n]: each neuron's write along its read direction (deletion score)
    provenance: dict[str, Any]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def site_record(site: Site) -> dict[str, Any]:
    return {"layer": site.layer, "expert": site.expert, "spec": site.spec.name, "n": site.moments.n,
            "gated": site.gated}


def save(path: str | os.PathLike, identity: dict[str, Any], windows: int, complete: bool, sites: list[Site],
         provenance: dict[str, Any]) -> None:
    tensors = {f"{i}.{name}": t.contiguous() for i, site in enumerate(sites)
               for name, t in site.moments.tensors().items()}
    tensors.update({f"{i}.w_along": site.w_along.double().contiguous() for i, site in enumerate(sites)})
    meta = {"format": FORMAT, "identity": identity, "windows": windows, "complete": complete,
            "sites": [site_record(s) for s in sites], "digest": _digest(tensors), "provenance": provenance}
    with atomic_write(path, binary=True) as fh:
        _write_safetensors(fh, tensors, {"mmdetect": json.dumps(meta, sort_keys=True)})


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}


def _write_safetensors(fh: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` in the safetensors format (the header, then each tensor's bytes in the header's order), written
    one tensor at a time: no buffer of the whole file (``safetensors.torch.save`` builds one, twice the state's size
    at its peak). safetensors' own reader reads it (``load``)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                  # the data starts 8-byte aligned, as safetensors writes it
    fh.write(len(text).to_bytes(8, "little"))
    fh.write(text)
    for t in tensors.values():
        if t.numel():
            fh.write(memoryview(t.contiguous().view(torch.uint8).numpy()))  # type: ignore[arg-type]


def load(path: str | os.PathLike) -> State:
    """A saved state, checked: CorruptInputError (one line) when it cannot be trusted."""
    from safetensors.torch import load as st_load

    path = Path(path)
    bad = f"{path} is not a usable mmdetect activations state"
    with os.fdopen(open_regular(path), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_STATE_BYTES:
            raise CorruptInputError(f"{bad} (it is {size:,} bytes); delete it to start again")
        data = fh.read()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header["__metadata__"]["mmdetect"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        identity, windows, complete = meta["identity"], int(meta["windows"]), bool(meta["complete"])
        records, provenance = meta["sites"], meta.get("provenance") or {}
        if not isinstance(identity, dict) or not isinstance(records, list) or windows < 0 or \
                not isinstance(provenance, dict):
            raise ValueError("malformed metadata")
    except MMDetectError:
        raise
    except Exception as exc:
        raise CorruptInputError(f"{bad} ({type(exc).__name__}: {str(exc)[:120]}); delete it to start again") from None
    if _digest(tensors) != meta.get("digest"):
        raise CorruptInputError(f"{bad}: its tensors do not match its recorded digest (edited or damaged); delete it "
                                f"to start again")
    moments, w_along = [], []
    for i, rec in enumerate(records):
        n = rec.get("n") if isinstance(rec, dict) else None
        try:
            m = Moments.from_tensors({name: tensors[f"{i}.{name}"] for name in Moments.empty(0).tensors()})
        except KeyError as exc:
            raise CorruptInputError(f"{bad}: tensor {exc} is missing; delete it to start again") from None
        ref = Moments.empty(int(n) if isinstance(n, int) else 0, int(m.top_val.shape[1]) if m.top_val.dim() == 2
                            else 0)
        for name, t in ref.tensors().items():
            got = m.tensors()[name]
            if got.dtype != t.dtype or got.shape != t.shape:
                raise CorruptInputError(f"{bad}: tensor {i}.{name} is {got.dtype} {tuple(got.shape)}, expected "
                                        f"{t.dtype} {tuple(t.shape)}; delete it to start again")
        w = tensors.get(f"{i}.w_along")
        if w is None or w.dtype != torch.float64 or tuple(w.shape) != (m.n,):
            raise CorruptInputError(f"{bad}: tensor {i}.w_along is missing or malformed; delete it to start again")
        moments.append(m)
        w_along.append(w)
    return State(identity, windows, complete, records, moments, w_along, provenance)


def differences(a: dict[str, Any], b: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """The identity keys whose values differ (``skip``: keys allowed to differ, the shard for a merge)."""
    return sorted(k for k in set(a) | set(b) if k not in skip and a.get(k) != b.get(k))
