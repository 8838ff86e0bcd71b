"""What was scanned and how: one schema for every command's output (scan, heads, chains, explain, sweep records).

Every output carries the same keys, in this order; settings that only one command has (the heads score, chains'
per-deleter count, ``scan --verify``'s corpus) go under ``options``. ``df.attrs["provenance"]`` and the JSON and
Parquet outputs hold ``Provenance.to_dict()``, a plain dict, so any metadata store takes it as it is.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

from mmdetect.version import __version__


class CheckpointLike(Protocol):
    """What provenance needs of an open checkpoint (``io.checkpoint.Checkpoint``), without importing it.

    Read-only members: provenance only reads them, and ``Checkpoint.model_type`` is a property."""

    @property
    def ref(self) -> str: ...
    @property
    def path(self) -> Any: ...
    @property
    def format(self) -> str: ...
    @property
    def model_type(self) -> str: ...
    @property
    def revision(self) -> str | None: ...

    def fingerprint(self) -> str: ...


@dataclass
class Provenance:
    tool: str = "mmdetect"
    command: str = "scan"
    version: str = __version__
    model: str | None = None                  # as given: a folder, a hub id or a .gguf file
    path: str | None = None                   # where it was read from
    format: str | None = None                 # safetensors, bin, gguf
    model_type: str | None = None
    family: str | None = None                 # the registry's MLP family
    attention_family: str | None = None       # the registry's attention layout (heads, chains, explain)
    heuristic: bool | None = None             # the MLP layout was guessed, not registered
    revision: str | None = None               # hub commit sha
    fingerprint: str | None = None            # sha256 over the weight files' names, sizes, headers and samples
    convention: str = "folded"
    threshold: float | None = None
    layers: str | list[int] | None = None     # as asked: "0-5,10", a sorted list, or None for all
    device: str | None = None
    torch: str | None = None
    created: str = ""                         # UTC, ISO 8601, to the second
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, ckpt: CheckpointLike, command: str, *, convention: str, threshold: float | None = None,
           layers: Any = None, device: str | None = None, family: str | None = None,
           attention_family: str | None = None, heuristic: bool | None = None, **options: Any) -> Provenance:
        """The provenance of ``command`` run on an open checkpoint, stamped now."""
        return cls(command=command, model=ckpt.ref, path=str(ckpt.path), format=ckpt.format,
                   model_type=ckpt.model_type, family=family, attention_family=attention_family,
                   heuristic=heuristic, revision=ckpt.revision, fingerprint=ckpt.fingerprint(),
                   convention=convention, threshold=threshold, layers=layers_spec(layers), device=device,
                   torch=_torch_version(), created=now(), options=dict(options))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        """Read a provenance dict, also one written by an older version: missing keys take their defaults, and keys
        this schema does not know (older versions kept ``score``, ``per_deleter``, ``verify`` … at the top level)
        move under ``options``."""
        if not isinstance(data, Mapping):
            raise TypeError(f"provenance must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names and k != "options"}
        options = dict(data.get("options") or {}) if isinstance(data.get("options"), Mapping) else {}
        options.update({k: v for k, v in data.items() if k not in names})
        return cls(**known, options=options)


def layers_spec(layers: Any) -> str | list[int] | None:
    """``--layers`` as recorded: the text as given (or None for all layers), an iterable as a sorted list."""
    if layers is None or isinstance(layers, str):
        return layers
    return sorted({int(x) for x in _iter(layers)})


def _iter(values: Any) -> Iterable[Any]:
    return values if isinstance(values, Iterable) else [values]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _torch_version() -> str | None:
    """torch's version when it is loaded (it always is once weights were read); provenance never imports it."""
    torch = sys.modules.get("torch")
    return str(torch.__version__) if torch is not None else None
