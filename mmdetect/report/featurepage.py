"""The report page of a transcoder scan (``scan --transcoder``: one row per feature, keyed ``layer, feature``).

The page is the neuron scan's page (``report.page.scan_data``) with the feature as its unit: the same per-layer
charts, sortable table and panels. ``page.js`` draws it unchanged in logic; ``feature_script`` gives it the feature's
words and keys (``FEATURE_TEXT``: each replacement names the exact text of ``page.js`` it replaces, and a ``page.js``
that no longer holds it is an error here, not a page with a neuron's word left in), so a neuron page's bytes never
depend on this module. ``features.js``, inlined after it on feature pages only, adds what only a transcoder has: the
per-layer transcoder facts (hooks, skip path, the model's own neurons beside), the Neuronpedia links in the table,
and the transcoder's facts in each panel.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# (text of page.js, what a feature page runs instead). Writers stay "neurons": a feature's upstream writers are the
# model's neurons, heads and embedding tokens, as a neuron's are.
FEATURE_TEXT: tuple[tuple[str, str], ...] = (
    ('"/E" + expert : "") + "N" + neuron;', '"/E" + expert : "") + "F" + neuron;'),
    ('      String(t.value("neuron", i));', '      String(t.value("feature", i));'),
    ('"aria-label": "neuron panel"', '"aria-label": "feature panel"'),
    ('/^l\\d+(\\/e\\S+)?[nh]\\d+$/', '/^l\\d+(\\/e\\S+)?[fh]\\d+$/'),
    ('neuron = t.value("neuron", i);', 'neuron = t.value("feature", i);'),
    ('" · neuron " + neuron + " · cos(read, write) "', '" · feature " + neuron + " · cos(read, write) "'),
    ('"No explain results for this neuron in this report: panels are computed " +\n'
     '        "for the top flagged neurons. For this one run: mmdetect explain MODEL --layer "',
     '"No explain results for this feature in this report: panels are computed " +\n'
     '        "for the top flagged features. For this one run: mmdetect explain MODEL --transcoder PATH --layer "'),
    ('" --neuron " + neuron));', '" --feature " + neuron));'),
    ('var nrn = doc.neuron || {};', 'var nrn = doc.feature || {};'),
    ('" neurons are flagged, fewer than the "', '" features are flagged, fewer than the "'),
    ("that the neuron's own write removes", "that the feature's own write removes"),
    ('stat("neurons", int(t.n_neurons))', 'stat("features", int(t.n_features))'),
    ('int(L.n_neurons) + " neurons · "', 'int(L.n_features) + " features · "'),
    ('int(merged.get(b) || 0) + " neurons");', 'int(merged.get(b) || 0) + " features");'),
    ('int(L.n_neurons) + " neurons flagged ("', 'int(L.n_features) + " features flagged ("'),
    ('"no neuron is flagged in any layer"', '"no feature is flagged in any layer"'),
    ("layer's neurons that are flagged. Hover for the numbers; click a layer to show only its neurons in the table.",
     "layer's features that are flagged. Hover for the numbers; click a layer to show only its features in the "
     "table."),
    ('"sw hist"}), "neurons (log scale)"', '"sw hist"}), "features (log scale)"'),
    ("(mismatched neuron pairs)", "(mismatched feature pairs)"),
    ('tableSection("Neurons", "neurons", tables.neurons,', 'tableSection("Features", "features", tables.features,'),
    ('"Every flagged neuron ("', '"Every flagged feature ("'),
    ('" (◆: explain results for " + nPanels + " neurons)"', '" (◆: explain results for " + nPanels + " features)"'),
    ("or a label such as L3N7;", "or a label such as L3F7;"),
    ('name: "neurons", placeholder: "search: L3N7, weakening,',
     'name: "features", placeholder: "search: L3F7, weakening,'),
    ('tb.value("neuron", i)); },\n        onRow:', 'tb.value("feature", i)); },\n        onRow:'),
)


def feature_script(js: str) -> str:
    """``page.js`` with the feature as its unit (``FEATURE_TEXT``, each replacement made exactly once)."""
    for old, new in FEATURE_TEXT:
        if js.count(old) != 1:
            raise RuntimeError(f"page.js holds {js.count(old)} copies of {old!r}, not one: update "
                               f"report.featurepage.FEATURE_TEXT to the new page.js")
        js = js.replace(old, new)
    return js


def is_feature_scan(cols: Mapping[str, Any]) -> bool:
    """Rows of a transcoder scan: keyed ``feature``, with no ``neuron`` column."""
    return "feature" in cols and "neuron" not in cols


def link_column(layer: np.ndarray, feature: np.ndarray, summary: list[dict[str, Any]]) -> np.ndarray | None:
    """Each row's Neuronpedia page from its layer's link template (``{feature}`` in the per-layer summary's
    ``neuronpedia``), None where the layer has none; None when no layer has one."""
    templates = {int(s["layer"]): s["neuronpedia"] for s in summary if isinstance(s.get("neuronpedia"), str)}
    if not templates:
        return None
    out = np.empty(len(layer), dtype=object)
    for i, (lay, f) in enumerate(zip(layer.tolist(), np.asarray(feature).tolist())):
        t = templates.get(int(lay)) if lay == lay else None
        out[i] = None if t is None or f is None or f != f else t.replace("{feature}", str(int(f)))
    return out
