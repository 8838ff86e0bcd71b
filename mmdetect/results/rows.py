"""A scan's rows as numpy columns: what the scanner returns and what the writers take without pandas.

numpy only (no torch, no pandas at import), so ``report`` can tell a ``ScanResult`` from a DataFrame with
``isinstance`` without pulling the scanner's dependencies into every report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd

COLUMNS = ["rank", "layer", "expert", "neuron", "cos", "cos_gate_out", "cos_gate_in", "flagged", "class", "z", "p",
           "z_layer", "norm_in", "norm_out", "norm_gate"]
# A transcoder scan (``scan --transcoder``): one row per feature, keyed ``layer, feature``; no expert, no gate.
FEATURE_COLUMNS = ["rank", "layer", "feature", "cos", "flagged", "class", "z", "p", "z_layer", "norm_in", "norm_out"]


@dataclass
class ScanResult:
    """A scan's rows as numpy columns (``COLUMNS``, ranked by cos) plus ``attrs`` (provenance, layers).

    The command line writes CSV, TSV and Parquet straight from these columns, so it never imports pandas (a quarter
    of a second); ``to_frame`` gives the DataFrame that the Python API returns.
    """

    columns: dict[str, np.ndarray]
    attrs: dict[str, Any]

    @property
    def key(self) -> str:
        """What a row is: ``neuron`` (a model's MLP neuron) or ``feature`` (a transcoder's feature)."""
        return "feature" if "feature" in self.columns and "neuron" not in self.columns else "neuron"

    def __len__(self) -> int:
        return len(self.columns["cos"])

    def select(self, mask: np.ndarray) -> ScanResult:
        """The rows where ``mask`` is true (ranks are kept), with the same attrs."""
        return ScanResult({k: v[mask] for k, v in self.columns.items()}, self.attrs)

    def flagged(self) -> ScanResult:
        return self.select(self.columns["flagged"])

    def to_frame(self) -> pd.DataFrame:
        import numpy as np
        import pandas as pd

        cols = dict(self.columns)
        ranks = pd.array(cols["rank"], dtype="Int64")
        ranks[~np.isfinite(cols["cos"])] = pd.NA  # dead neurons have no rank
        cols["rank"] = ranks
        # The scan's columns, then any joined onto them (``scan --activations``), in their order.
        base = FEATURE_COLUMNS if self.key == "feature" else COLUMNS
        df = pd.DataFrame(cols, columns=[*base, *(k for k in cols if k not in base)])
        df.attrs = self.attrs
        return df


def is_flagged(values: Any, threshold: float) -> np.ndarray:
    """values <= threshold, NaN never: the one decision of "flagged" (a neuron by its cos, a head by its copying
    score, in every command), made in float64. A float32 score widens exactly and the threshold is not rounded to
    float32, so a score at the threshold is flagged by every command or by none."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(v) & (v <= threshold)


def flagged_rows(rows: Any) -> Any:
    """Only the flagged rows of a ``ScanResult`` or a DataFrame (any table with a ``flagged`` column), same attrs."""
    if isinstance(rows, ScanResult):
        return rows.flagged()
    out = rows[rows["flagged"].to_numpy(dtype=bool)].reset_index(drop=True)
    out.attrs = rows.attrs
    return out
