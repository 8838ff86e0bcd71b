"""Layer selections: ``--layers 0-5,10`` (and ``layers:`` in a zoo config) as ranges, never as a set of every layer.

``0-99999999999`` is two integers here, not a hundred billion set members. A selection is checked against a model's
layers only once they are known (``LayerSet.select``): layers past the model's last one are dropped with a warning,
and a selection that leaves none of its layers is an error.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Iterable

from mmdetect.errors import CorruptInputError, NotFoundError, warn


@dataclass(frozen=True)
class LayerSet:
    """Inclusive ranges ``[(lo, hi), ...]``, sorted and merged. Supports ``in``, ``&`` and ``-`` with finite sets of
    layers and ``set <= layer_set``; it cannot be iterated (it may be astronomically large)."""

    ranges: tuple[tuple[int, int], ...]
    text: str

    def __contains__(self, layer: object) -> bool:
        if not isinstance(layer, int):
            return False
        k = bisect.bisect_right(self.ranges, (layer, float("inf"))) - 1
        return k >= 0 and self.ranges[k][0] <= layer <= self.ranges[k][1]

    def __and__(self, other: Iterable[int]) -> set[int]:
        return {layer for layer in other if layer in self}

    __rand__ = __and__

    def __rsub__(self, other: Iterable[int]) -> set[int]:
        return {layer for layer in other if layer not in self}

    def __ge__(self, other: Iterable[int]) -> bool:  # ``values <= layer_set`` for a set of layers
        return all(layer in self for layer in other)

    @classmethod
    def of(cls, layers: Any) -> LayerSet | None:
        """A selection from the API's ``layers=``: a spec string, None (all layers), or an iterable of layer ints."""
        if layers is None or isinstance(layers, (str, int)):
            return parse_layers(None if layers is None else str(layers))
        chosen = sorted({int(n) for n in layers})
        return parse_layers(",".join(map(str, chosen))) if chosen else cls((), "")

    @property
    def last(self) -> int:
        return self.ranges[-1][1]

    def select(self, available: Iterable[int], option: str = "--layers") -> set[int]:
        """The model's layers (``available``) inside the selection; past-the-end layers are dropped with a warning."""
        have = sorted(set(available))
        chosen = self & have
        if not chosen:
            span = f"0-{have[-1]}" if have else "none"
            raise NotFoundError(f"{option} selects none of this model's layers ({span})")
        if have[-1] < self.last:
            warn(f"{option} {self.text} reaches past this model's last layer ({have[-1]}); those layers are skipped")
        return chosen


def parse_layers(text: Any) -> LayerSet | None:
    """'0-5,10' -> LayerSet(((0, 5), (10, 10))); None or '' -> None (all layers)."""
    if text is None or text == "":
        return None
    spans: list[tuple[int, int]] = []
    for part in str(text).split(","):
        m = re.fullmatch(r"(\d{1,30})(?:-(\d{1,30}))?", part.strip())
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise CorruptInputError(f"--layers {text!r} is not a list of layers: use e.g. 0-5,10")
        spans.append((int(m.group(1)), int(m.group(2) or m.group(1))))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return LayerSet(tuple(merged), str(text))
