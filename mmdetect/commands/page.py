"""SOURCE -> the report page: ``mmdetect report SOURCE -o page.html`` and ``mmdetect scan MODEL --format html``.

``detect`` tells what SOURCE is by looking at it:

* ``model``: a checkpoint folder, a hub id or a .gguf file. It is scanned with the scan options; then, with one open
  circuit, the top K flagged neurons are explained (upstream writers, the vocabulary view, and the activation
  evidence when transformers is importable), and the heads and the writer -> deleter chains are computed when the
  attention layout is supported. What was left out, and why, is written on the page.
* ``scan``: a scan's csv, tsv, json, jsonl or parquet output with its provenance (inside JSON and Parquet; from a
  sibling ``.meta.json``, ``.json`` or ``.parquet`` for the text formats).
* ``sweep``: a ``mmdetect sweep`` output folder (summary.csv and results.json).
* ``track``: a ``mmdetect track`` output folder (track.json).

A model or a scan output also takes extra files (``extras``): heads or chains outputs of any file format, and
``mmdetect explain --format json`` documents. They are used instead of computing the same thing.

A transcoder scan (``mmdetect scan MODEL --transcoder PATH``, one row per feature) gets the same page with the
feature as its unit (``report.featurepage``), and so does a model given with a transcoder (``transcoder_page``:
the features scanned, the top flagged ones explained). Its extra files are ``explain --transcoder`` documents.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from mmdetect.convention import DEFAULT
from mmdetect.errors import THRESHOLD, CorruptInputError, MMDetectError, NotFoundError, UnsupportedError, warn

TOP_K = 20                      # neurons explained (panels)
TOP_ROWS = 2000                 # table rows besides the flagged ones
SCAN_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".parquet", ".pq")
Log = Callable[[str], None]


@dataclass
class Built:
    """A page and the one line that says what is on it (for stderr)."""

    html: str
    kind: str
    summary: str


# -- what SOURCE is ---------------------------------------------------------------------------------------------------

def detect(source: str) -> str:
    """``model``, ``scan``, ``sweep`` or ``track``; a one-line MMDetectError for anything else."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "track.json").is_file():
            return "track"
        if (path / "summary.csv").is_file() and (path / "results.json").is_file():
            return "sweep"
        if (path / "config.json").is_file():
            return "model"
        raise NotFoundError(f"{source} is a folder but not a checkpoint (config.json), a sweep output (summary.csv and "
                            f"results.json) or a track output (track.json): give one of those")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return "model"
        if suffix in SCAN_SUFFIXES:
            return "scan"
        raise UnsupportedError(f"{source} is neither a .gguf model nor a scan output ({', '.join(SCAN_SUFFIXES)}): "
                               f"give a model, a scan output, or a sweep or track output folder")
    if path.suffix.lower() in SCAN_SUFFIXES + (".gguf",) or source.startswith((".", "/", "~")) \
            or (str(path.parent) != "." and path.parent.is_dir()):
        raise NotFoundError(f"{source} does not exist: check the path")
    return "model"  # a hub id: the checkpoint loader finds it in the cache, or says why not


# -- extra files: heads, chains, explain documents ---------------------------------------------------------------------

@dataclass
class Extras:
    heads: Any = None
    chains: Any = None
    explain: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)   # "heads", "chains" -> the file each came from
    explain_files: list[str] = field(default_factory=list)  # the file of each explain document

    def check_unit(self, unit: str, where: str) -> None:
        """Refuse, in one line, extras that do not fit a page of ``unit`` rows ("neuron" or "feature"); ``where``
        says what the page is of ("x.parquet is a neuron scan")."""
        from mmdetect.errors import UsageError

        for doc, name in zip(self.explain, self.explain_files):
            if unit not in doc:
                if unit == "feature":
                    raise UsageError(f"--with {name} explains a neuron and {where}: give `mmdetect explain MODEL "
                                     f"--transcoder PATH -l L --feature F --format json` outputs")
                raise UsageError(f"--with {name} explains a transcoder feature and {where}: give it with the "
                                 f"transcoder's scan (`mmdetect scan MODEL --transcoder PATH -o tc.parquet`) as "
                                 f"SOURCE, or `mmdetect report MODEL --transcoder PATH`")
        if unit == "feature":
            for part, name in self.files.items():
                raise UsageError(f"--with {name} is a {part} output, and {where}, whose page shows its features "
                                 f"only: add it to the model's page (`mmdetect report MODEL --with {name}`)")


def _table_file(path: Path) -> Any:
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".ndjson"):
        return pd.read_json(path, lines=True)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    raise UnsupportedError(f"--with {path}: give a heads or chains output (csv, tsv, json, jsonl, parquet) or an "
                           f"explain JSON document")


def read_extras(paths: Iterable[str]) -> Extras:
    """Sort ``--with`` files by what they hold: ``copying`` -> heads, ``deleter`` -> chains, an explain document."""
    out = Extras()
    for name in paths:
        import pandas as pd

        path = Path(name)
        try:
            if path.suffix.lower() == ".json":
                doc = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(doc, dict) and ("neuron" in doc or "feature" in doc) and "writers" in doc:
                    out.explain.append(doc)
                    out.explain_files.append(name)
                    continue
                key = next((k for k in ("heads", "chains") if isinstance(doc, dict) and isinstance(doc.get(k), list)),
                           None)
                if key is None:
                    raise CorruptInputError(f"--with {name}: a JSON file that is not a heads, chains or explain output")
                frame = pd.DataFrame(doc[key])
            else:
                frame = _table_file(path)
        except (ValueError, OSError, KeyError) as exc:
            raise CorruptInputError(f"--with {name} cannot be read ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
        if "copying" in frame.columns:
            out.heads, out.files["heads"] = frame, name
        elif "deleter" in frame.columns:
            out.chains, out.files["chains"] = frame, name
        else:
            raise CorruptInputError(f"--with {name} has neither a copying column (heads) nor a deleter column (chains)"
                                    + ("; a scan output is the SOURCE, not --with" if "cos" in frame.columns else ""))
    return out


# -- a model ----------------------------------------------------------------------------------------------------------

def _where(columns: dict[str, Any], i: int) -> tuple[int, Any, int]:
    """(layer, expert, neuron) of row ``i``; of a transcoder scan's row, (layer, None, feature)."""
    from mmdetect.report.featurepage import is_feature_scan

    if is_feature_scan(columns):
        return int(columns["layer"][i]), None, int(columns["feature"][i])
    expert = columns["expert"][i]
    if expert is not None and isinstance(expert, float) and math.isnan(expert):
        expert = None
    return int(columns["layer"][i]), expert.item() if hasattr(expert, "item") else expert, int(columns["neuron"][i])


def top_flagged(columns: dict[str, Any], k: int) -> list[tuple[int, Any, int]]:
    """(layer, expert label or None, neuron) of the first ``k`` flagged rows (rows are ranked by cos)."""
    import numpy as np

    idx = np.flatnonzero(np.asarray(columns["flagged"], dtype=bool))[:k]
    return [_where(columns, i) for i in idx.tolist()]


def top_neurons(columns: dict[str, Any], k: int) -> tuple[list[tuple[int, Any, int]], int]:
    """The neurons the page explains: the first ``k`` flagged rows and, when fewer than ``k`` are flagged, the most
    negative others (finite cos, in rank order) up to ``k``. Returns them and how many of them are flagged (the
    first ones; the rest are below the threshold)."""
    import numpy as np

    flagged = np.asarray(columns["flagged"], dtype=bool)
    first = np.flatnonzero(flagged)[:k]
    rest = np.flatnonzero(~flagged & np.isfinite(np.asarray(columns["cos"], dtype=np.float64)))[:max(0, k - len(first))]
    return [_where(columns, i) for i in np.concatenate([first, rest]).tolist()], len(first)


def explain_top(circuit: Any, wanted: list[tuple[int, Any, int]], *, activations: bool, text: str | None = None,
                dataset: str | None = None, field_name: str = "text", max_tokens: int = 4096, seq_len: int = 128,
                top: int = 10, n_contexts: int = 8, off: str = "--no-activations") -> list[dict[str, Any]]:
    """``explain`` for many neurons of one open circuit: the documents ``analysis.explain.explain`` returns, one per
    neuron of ``wanted``, with the costly parts done once for all of them (one pass over the earlier layers and the
    embedding for the upstream writers, one model load and one run over the text for the activation evidence).
    ``off``: why there is no activation evidence when ``activations`` is false."""
    from mmdetect.analysis.explain import find_targets

    return explain_targets(circuit, find_targets(circuit, wanted), [{}] * len(wanted), activations=activations,
                           text=text, dataset=dataset, field_name=field_name, max_tokens=max_tokens,
                           seq_len=seq_len, top=top, n_contexts=n_contexts, off=off)


def explain_targets(circuit: Any, targets: list[Any], facts: list[dict[str, Any]], *, activations: bool,
                    text: str | None = None, dataset: str | None = None, field_name: str = "text",
                    max_tokens: int = 4096, seq_len: int = 128, top: int = 10, n_contexts: int = 8,
                    off: str = "--no-activations") -> list[dict[str, Any]]:
    """``explain_top`` for explain targets already found (``analysis.targets.Target``: neurons, or transcoder
    features from ``analysis.features.find_feature``), each document keyed by its target's kind and carrying the
    row of ``facts`` beside its scan row."""
    from mmdetect.analysis.evidence import evidence, load_hf_model, vocab_size_from_config
    from mmdetect.analysis.explain import head_null_hi, neuron_stats, writers_and_vocab
    from mmdetect.corpus.sources import resolve_source
    from mmdetect.corpus.vocab import load_vocab
    from mmdetect.scanner.stats import null_band

    d = circuit.d_model
    vocab = load_vocab(circuit.ckpt, circuit.vocab_size()) if circuit.attention is not None else None
    writers, views = writers_and_vocab(circuit, targets, vocab, top)
    lo, hi = null_band(d)
    dh = circuit.head_dim(circuit.attention_layers[0]) if circuit.attention is not None else None
    shared = {"null_band": [lo, hi], "head_subspace_null_hi": head_null_hi(d, dh) if dh else None,
              "parallel_block": bool(circuit.attention and circuit.attention.parallel)}
    docs = []
    for target, fact, found, view in zip(targets, facts, writers, views):
        docs.append({"provenance": {"attention_gap": circuit.attention_gap},
                     target.kind: {**neuron_stats(target), **fact},
                     "writers": {**shared, **found}, "vocab": view,
                     "tokens": vocab.kind if vocab is not None else None})
    if not activations:
        skipped: dict[str, Any] = {"skipped": off}
    elif importlib.util.find_spec("transformers") is None:
        skipped = {"skipped": "transformers is not installed (pip install 'mmdetect[slow]')"}
    else:
        try:
            corpus = resolve_source(text, dataset, field_name)
            model_hf = load_hf_model(circuit)  # first: a model transformers cannot build needs no vocabulary
            if vocab is None:
                vocab = load_vocab(circuit.ckpt, vocab_size_from_config(circuit))
            found_ev = evidence(circuit, targets, corpus, vocab, max_tokens=max_tokens, seq_len=seq_len,
                                n_contexts=n_contexts, model=model_hf)
            for doc, ev in zip(docs, found_ev):
                doc["activations"] = ev
            return docs
        except MMDetectError as exc:
            if text or dataset:
                raise
            warn(f"no activation evidence: {exc}")
            skipped = {"skipped": str(exc)}
    for doc in docs:
        doc["activations"] = dict(skipped)
    return docs


def model_page(model: str, *, revision: str | None = None, convention: str = DEFAULT, threshold: float = THRESHOLD,
               layers: str | None = None, device: str = "cpu", progress: bool | None = None, top_k: int = TOP_K,
               top_rows: int = TOP_ROWS, heads: bool = True, chains: bool = True, activations: bool | None = None,
               text: str | None = None, dataset: str | None = None, field_name: str = "text",
               max_tokens: int = 4096, seq_len: int = 128, extras: Iterable[str] = (), log: Log | None = None,
               leave_out: str | None = None, no_activations: str = "--no-activations",
               stats: str | None = None, transcoder: str | None = None) -> Built:
    """Scan ``model`` and put the scan, the explained top ``top_k`` neurons (flagged first; the most negative others
    when fewer are flagged, marked below the threshold), the heads and the chains on one page. ``activations``: None
    = when transformers is importable. ``leave_out`` and ``no_activations``: why heads and chains, and the activation
    evidence, were not asked for (said on the page instead of "--no-heads"...). ``stats``: an ``mmdetect
    activations`` output to join (or "auto": run the corpus pass with its defaults), see ``load_stats``.
    ``transcoder``: the page of its features instead (``transcoder_page``)."""
    import numpy as np

    from mmdetect.analysis.circuit import open_circuit
    from mmdetect.report.page import scan_page
    from mmdetect.scanner import scan

    if transcoder is not None:
        return transcoder_page(model, transcoder, revision=revision, convention=convention, threshold=threshold,
                               layers=layers, device=device, progress=progress, top_k=top_k, top_rows=top_rows,
                               activations=activations, text=text, dataset=dataset, field_name=field_name,
                               max_tokens=max_tokens, seq_len=seq_len, extras=extras, log=log,
                               no_activations=no_activations, stats=stats)
    say = log or (lambda _m: None)
    add = read_extras(extras)
    add.check_unit("neuron", f"the page of {model} shows its neurons")
    name, fingerprint = model_identity(model, revision)
    measured = load_stats(stats, model, fingerprint=fingerprint, convention=convention, revision=revision,
                          layers=layers, device=device, text=text, dataset=dataset, field_name=field_name,
                          progress=progress, say=say) if stats else None
    result = scan(model, revision=revision, threshold=threshold, layers=layers, device=device, progress=progress,
                  as_frame=False, convention=convention)
    cols = result.columns
    n_flagged = int(np.asarray(cols["flagged"], dtype=bool).sum())
    say(f"scanned {len(result):,} neurons, {n_flagged:,} flagged")
    wanted, n_above = top_neurons(cols, top_k)
    if measured is not None and activations is None:
        activations = False       # the corpus statistics are the panels' activation evidence
        no_activations = "the corpus statistics (--activations) below are this neuron's activation evidence"
    notes = {part: leave_out or f"not computed (--no-{part})" for part, on in (("heads", heads), ("chains", chains))
             if not on}
    docs: list[dict[str, Any]] = []
    heads_df, chains_df = add.heads, add.chains
    want_heads, want_chains = heads and heads_df is None, chains and chains_df is None
    if wanted or want_heads or want_chains:
        with open_circuit(model, revision=revision, convention=convention) as circuit:
            if wanted:
                # None: when transformers is importable (explain_top says so on each panel when it is not)
                on = activations is not False
                say(f"explaining the top {len(wanted)} neurons ({n_above} flagged)" + (" (with activation evidence)"
                    if on and importlib.util.find_spec("transformers") is not None else ""))
                docs = explain_top(circuit, wanted, activations=on, text=text, dataset=dataset,
                                   field_name=field_name, max_tokens=max_tokens, seq_len=seq_len,
                                   off=no_activations)
                for doc in docs[n_above:]:
                    doc["below_threshold"] = {"threshold": threshold, "flagged": n_flagged, "top_k": top_k}
            if want_heads and circuit.attention is None:
                notes["heads"], want_heads = str(circuit.attention_gap), False
            if want_heads:
                say("scoring attention heads")
                heads_df = _optional("heads", notes, lambda: _heads(circuit, layers))
            if want_chains:
                chains_df = _chains(circuit, threshold, layers, n_flagged, heads_df, notes, say)
    _panels_note(notes, len(wanted), n_above, n_flagged, threshold, top_k)
    docs = _merge_docs(docs, add.explain)
    html = scan_page(result.columns, result.attrs["layers"], result.attrs["provenance"], explain=docs,
                     heads=heads_df, chains=chains_df, top_rows=top_rows, notes=notes, stats=measured, name=name)
    parts = [f"{len(result):,} neurons", f"{n_flagged:,} flagged", f"{len(docs)} panels"]
    parts += [f"{len(df):,} {name}" for name, df in (("heads", heads_df), ("chains", chains_df)) if df is not None]
    return Built(html, "model", f"scan of {result.attrs['provenance'].get('model')}: {', '.join(parts)}")


TRANSCODER_LEAVES_OUT = "not part of a transcoder's page: `mmdetect report MODEL` has the model's {0}"


def transcoder_page(model: str, transcoder: str, *, revision: str | None = None, convention: str = DEFAULT,
                    threshold: float = THRESHOLD, layers: str | None = None, device: str = "cpu",
                    progress: bool | None = None, top_k: int = TOP_K, top_rows: int = TOP_ROWS,
                    activations: bool | None = None, text: str | None = None, dataset: str | None = None,
                    field_name: str = "text", max_tokens: int = 4096, seq_len: int = 128,
                    extras: Iterable[str] = (), log: Log | None = None, no_activations: str = "--no-activations",
                    stats: str | None = None) -> Built:
    """``model_page`` for the features of the SAELens transcoder(s) at ``transcoder`` standing in for ``model``'s
    MLPs: the features scanned as ``scan --transcoder --neurons`` scans them (``analysis.features.scan_transcoder``,
    the model's own neurons beside), and the top ``top_k`` (flagged first) explained as ``explain --transcoder``
    explains one (``analysis.features.find_feature``, then ``explain_targets``: one pass for all of them). Heads and
    chains are the model's, left to its own page; corpus statistics are per neuron, so refused."""
    import numpy as np

    from mmdetect.analysis.circuit import open_circuit
    from mmdetect.analysis.features import find_feature, scan_transcoder
    from mmdetect.errors import UsageError
    from mmdetect.io.transcoder import opened_transcoders
    from mmdetect.report.page import scan_page

    where = f"the page of --transcoder {transcoder} is a transcoder scan (one row per feature)"
    if stats:
        raise UsageError(_STATS_PER_NEURON.format(stats=stats, where=where))
    say = log or (lambda _m: None)
    add = read_extras(extras)
    add.check_unit("feature", where)
    name, _fingerprint = model_identity(model, revision)
    result = scan_transcoder(model, transcoder, revision=revision, threshold=threshold, convention=convention,
                             layers=layers, device=device, progress=progress, neurons=True, as_frame=False)
    cols = result.columns
    n_flagged = int(np.asarray(cols["flagged"], dtype=bool).sum())
    say(f"scanned {len(result):,} features, {n_flagged:,} flagged")
    wanted, n_above = top_neurons(cols, top_k)
    docs: list[dict[str, Any]] = []
    if wanted:
        on = activations is not False
        say(f"explaining the top {len(wanted)} features ({n_above} flagged)" + (" (with activation evidence)"
            if on and importlib.util.find_spec("transformers") is not None else ""))
        with opened_transcoders(transcoder) as tcs, \
                open_circuit(model, revision=revision, convention=convention) as circuit:
            found = [find_feature(circuit, tcs, layer, feature, str(transcoder)) for layer, _e, feature in wanted]
            docs = explain_targets(circuit, [t for t, _ in found], [f for _, f in found], activations=on, text=text,
                                   dataset=dataset, field_name=field_name, max_tokens=max_tokens, seq_len=seq_len,
                                   off=no_activations)
        for doc in docs[n_above:]:
            doc["below_threshold"] = {"threshold": threshold, "flagged": n_flagged, "top_k": top_k}
    notes = {part: TRANSCODER_LEAVES_OUT.format(part) for part in ("heads", "chains")}
    _panels_note(notes, len(wanted), n_above, n_flagged, threshold, top_k, "feature")
    docs = _merge_docs(docs, add.explain)
    html = scan_page(cols, result.attrs["layers"], result.attrs["provenance"], explain=docs, top_rows=top_rows,
                     notes=notes, name=name)
    return Built(html, "model", f"transcoder scan of {result.attrs['provenance'].get('model')}: "
                                f"{len(result):,} features, {n_flagged:,} flagged, {len(docs)} panels")


_STATS_PER_NEURON = ("--activations {stats}: corpus statistics are per neuron (`mmdetect activations`), and {where}: "
                     "leave --activations out")


def model_name(model: str) -> str:
    """The model's name for a terminal header, as the page's title has it (``io.checkpoint.display_name``): a local
    folder or file is opened, headers only, for its hub id (inside the Hugging Face cache), its config's
    ``_name_or_path`` or its GGUF ``general.name``; anything else is a hub id and named as given (nothing is
    resolved again, so a header never reaches the network)."""
    from mmdetect.io.checkpoint import display_name, open_checkpoint

    if not Path(model).expanduser().exists():
        return model
    with open_checkpoint(model) as ckpt:
        return display_name(ckpt)


def _panels_note(notes: dict[str, str], n_wanted: int, n_above: int, n_flagged: int, threshold: float,
                 top_k: int, unit: str = "neuron") -> None:
    """Why there are no panels, or why some panels show neurons (or features) below the threshold."""
    if not n_wanted:
        notes.setdefault("panels", f"no {unit} was explained (--top-k 0)" if top_k == 0 else
                         f"no {unit} has a cosine, so no {unit} was explained")
    elif n_above < n_wanted:
        notes.setdefault("panels", f"{n_flagged:,} {unit}{'' if n_flagged == 1 else 's'} flagged (cos ≤ "
                         f"{threshold:g}), fewer than --top-k {top_k}: the {n_wanted - n_above} most negative "
                         f"others are explained too, their panels marked below the threshold")


def model_identity(model: str, revision: str | None = None) -> tuple[str, str]:
    """(the model's display name, its weights' fingerprint), from its headers only."""
    from mmdetect.io.checkpoint import display_name, open_checkpoint

    with open_checkpoint(model, revision=revision) as ckpt:
        return display_name(ckpt), ckpt.fingerprint()


def check_stats(stats: Any, where: str, *, fingerprint: str | None, convention: str | None) -> None:
    """Refuse, in one line, statistics measured on other weights or in another convention than the scan's."""
    from mmdetect.errors import UsageError

    prov = stats.provenance
    if fingerprint and prov.fingerprint and prov.fingerprint != fingerprint:
        raise UsageError(f"--activations {where} was measured on another model (fingerprint "
                         f"{str(prov.fingerprint)[:12]}…, this model's is {fingerprint[:12]}…): run `mmdetect "
                         f"activations MODEL -o STATS` on this model, or give --activations auto")
    if convention and prov.convention and prov.convention != convention:
        raise UsageError(f"--activations {where} is in the {prov.convention} convention and this report in the "
                         f"{convention} one: rerun `mmdetect activations --convention {convention}`, or report with "
                         f"--convention {prov.convention}")


def load_stats(spec: str, model: str | None, *, fingerprint: str | None, convention: str | None,
               revision: str | None = None, layers: str | None = None, device: str = "cpu",
               text: str | None = None, dataset: str | None = None, field_name: str = "text",
               progress: bool | None = None, say: Log | None = None) -> Any:
    """The corpus statistics to join: ``spec`` is an ``mmdetect activations`` output (read back and checked with
    ``report.activations.read_stats``) or "auto" (``corpus.activations.run`` with the defaults of a ``Request``, on
    the report's text options when given). Refused when measured on other weights or in another convention."""
    from mmdetect.errors import UsageError

    if spec == "auto":
        if model is None:
            raise UsageError("--activations auto runs the model: give a model as SOURCE, or a stats file")
        from mmdetect.corpus.activations import Request, run

        (say or (lambda _m: None))("measuring every neuron over the corpus (--activations auto)")
        stats = run(Request(model, revision=revision, convention=convention or DEFAULT, layers=layers,
                            device=device, text=text, dataset=dataset, field_name=field_name, progress=progress))
    else:
        from mmdetect.report.activations import read_stats

        stats = read_stats(spec)
    check_stats(stats, spec, fingerprint=fingerprint, convention=convention)
    return stats


def _optional(what: str, notes: dict[str, str], compute: Callable[[], Any]) -> Any:
    """A section of the page that may fail on its own (a layout this part does not support): the page says why."""
    try:
        return compute()
    except MMDetectError as exc:
        warn(f"{what} left out: {exc}")
        notes[what] = str(exc)
        return None


def _heads(circuit: Any, layers: str | None) -> Any:
    from mmdetect.analysis.heads import scan_circuit

    return scan_circuit(circuit, threshold=THRESHOLD, layers=layers)


def _chains(circuit: Any, threshold: float, layers: str | None, n_flagged: int, heads_df: Any,
            notes: dict[str, str], say: Log) -> Any:
    """Writer -> deleter pairs; skipped when it is known that nothing is flagged (the table would be empty)."""
    import numpy as np

    from mmdetect.analysis.chains import chains_circuit

    head_deleters = 0 if circuit.attention is None else (
        None if heads_df is None else int(np.asarray(heads_df["flagged"], dtype=bool).sum()))
    if n_flagged == 0 and head_deleters == 0:
        notes["chains"] = "no neuron and no head is flagged, so there is no deleter to list writers for"
        return None
    if circuit.attention is None:
        notes["chains"] = f"neuron deleters only: {circuit.attention_gap}"
    say("finding writer -> deleter chains")
    return _optional("chains", notes, lambda: chains_circuit(circuit, threshold=threshold,
                                                              head_threshold=THRESHOLD, layers=layers,
                                                              heads=circuit.attention is not None))


def _merge_docs(computed: list[dict[str, Any]], given: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Explain documents, those given with --with replacing computed ones for the same neuron."""
    def key(doc: dict[str, Any]) -> tuple:
        unit = "neuron" if "neuron" in doc else "feature"
        n = doc.get(unit) or {}
        return n.get("layer"), None if n.get("expert") is None else str(n.get("expert")), n.get(unit)

    out = {key(d): d for d in computed}
    out.update({key(d): d for d in given})
    return list(out.values())


# -- existing outputs -------------------------------------------------------------------------------------------------

def scan_output_page(path: str, *, top_rows: int = TOP_ROWS, extras: Iterable[str] = (),
                     stats: str | None = None) -> Built:
    """The page of a scan output file (and --with files, and an ``mmdetect activations`` output to join)."""
    from mmdetect.errors import UsageError
    from mmdetect.report.featurepage import is_feature_scan
    from mmdetect.report.page import scan_page
    from mmdetect.report.plot import read_scan

    add = read_extras(extras)
    df, meta = read_scan(path)
    if "cos" not in df.columns:
        raise CorruptInputError(f"{path} has no cos column: it is not an mmdetect scan output")
    features = is_feature_scan(df.columns)
    where = f"{path} is a transcoder scan (one row per feature)" if features else f"{path} is a neuron scan"
    add.check_unit("feature" if features else "neuron", where)
    if features and stats:
        raise UsageError(_STATS_PER_NEURON.format(stats=stats, where=where))
    if not meta:
        warn(f"no provenance for {path} (no sibling .meta.json, .json or .parquet): the page cannot say which "
             f"convention or threshold the numbers are in")
    hint = "not part of this report: add a `mmdetect {0} MODEL -o {0}.csv` output with --with {0}.csv"
    if features:
        hint = TRANSCODER_LEAVES_OUT
    notes = {"heads": hint.format("heads")} if add.heads is None else {}
    if add.chains is None:
        notes["chains"] = hint.format("chains")
    if not add.explain:
        notes["panels"] = "no explain results: add `mmdetect explain MODEL " + (
            "--transcoder PATH -l L --feature F --format json -o f.json` outputs with --with f.json" if features else
            "-l L -n N --format json -o n.json` outputs with --with n.json")
    prov = meta.get("provenance") or {}
    measured = None
    if stats:
        measured = load_stats(stats, None, fingerprint=prov.get("fingerprint"), convention=prov.get("convention"))
    html = scan_page(df, meta.get("layers") or None, prov, explain=add.explain,
                     heads=add.heads, chains=add.chains, top_rows=top_rows, notes=notes, stats=measured)
    model = (meta.get("provenance") or {}).get("model") or Path(path).name
    return Built(html, "scan", f"scan output {path} ({model}): {len(df):,} rows, {len(add.explain)} panels")


def sweep_output_page(folder: str) -> Built:
    from mmdetect.report.page import load_sweep, sweep_page

    try:
        summary, per_model = load_sweep(folder)
    except (ValueError, OSError, KeyError) as exc:
        raise CorruptInputError(f"{folder} is not a readable sweep output ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
    if "name" not in summary.columns:
        raise CorruptInputError(f"{folder}/summary.csv has no name column: it is not a sweep's summary")
    return Built(sweep_page(summary, per_model), "sweep", f"sweep {folder}: {len(summary)} models")


def track_output_page(folder: str) -> Built:
    from mmdetect.report.trackpage import load_track, track_page

    data = load_track(folder)
    steps = data["doc"].get("steps") or []
    return Built(track_page(**data), "track", f"track {folder}: {len(steps)} checkpoints")


# -- any source -------------------------------------------------------------------------------------------------------

def build(source: str, **options: Any) -> Built:
    """The page for ``source`` (see the module docstring); ``options`` are ``model_page``'s, of which a scan output
    uses ``top_rows`` and ``extras`` and a sweep or track folder none."""
    kind = detect(source)
    if kind == "model":
        return model_page(source, **options)
    if kind == "scan":
        return scan_output_page(source, top_rows=options.get("top_rows", TOP_ROWS), extras=options.get("extras", ()),
                                stats=options.get("stats"))
    if kind == "sweep":
        return sweep_output_page(source)
    return track_output_page(source)


def write(built: Built, output: str) -> int:
    """Write the page atomically; returns its size in bytes."""
    from mmdetect.report import atomic_open

    data = built.html.encode("utf-8")
    with atomic_open(output, binary=True) as fh:
        fh.write(data)
    return len(data)


# -- Neuronpedia -------------------------------------------------------------------------------------------------------

def vocab_views(circuit: Any, wanted: list[tuple[int, Any, int]], k: int) -> list[dict[str, Any] | None]:
    """The vocabulary view (top ``k`` promoted and suppressed tokens) of each neuron of ``wanted``, from one pass over
    the unembedding; None for each when the model has no attention layout (no final norm to read)."""
    from mmdetect.analysis.explain import VocabView
    from mmdetect.analysis.passes import writer_items, writer_pass
    from mmdetect.analysis.targets import find_targets
    from mmdetect.corpus.vocab import load_vocab

    if not wanted or circuit.attention is None:
        return [None] * len(wanted)
    targets = find_targets(circuit, wanted)
    vocab = load_vocab(circuit.ckpt, circuit.vocab_size())
    view = VocabView(targets, k)
    writer_pass(circuit, [view], writer_items(circuit, set(), set(), tokens=False, logits=True))
    return list(view.result(circuit, vocab))


def neuronpedia_export(model: str, output: str, *, stats: str, revision: str | None = None,
                       convention: str = DEFAULT, threshold: float = THRESHOLD, layers: str | None = None,
                       device: str = "cpu", progress: bool | None = None, top_k: int = TOP_K,
                       model_id: str | None = None, source_set: str = "mmdetect-mlp", text: str | None = None,
                       dataset: str | None = None, field_name: str = "text", log: Log | None = None) -> list[Path]:
    """The neurons the page would explain (``top_neurons``) as Neuronpedia upload batches in the folder ``output``
    (``report.neuronpedia``): one ``<source>.<k>.json`` per 128 features of a layer, and ``manifest.json`` (model id,
    source set, each neuron's layer, expert, neuron, source, index and file, the provenance of the scan and the
    statistics). Every file is written atomically; returns the batch files."""
    from mmdetect.analysis.circuit import open_circuit
    from mmdetect.errors import OutputError, UsageError
    from mmdetect.io.output import atomic_write
    from mmdetect.report import neuronpedia
    from mmdetect.scanner import scan

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", source_set):
        raise UsageError(f"--neuronpedia-source-set {source_set!r}: use lowercase letters, digits and hyphens")
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"-o {output} is a file: --format neuronpedia writes a folder of batches")
    say = log or (lambda _m: None)
    name, fingerprint = model_identity(model, revision)
    measured = load_stats(stats, model, fingerprint=fingerprint, convention=convention, revision=revision,
                          layers=layers, device=device, text=text, dataset=dataset, field_name=field_name,
                          progress=progress, say=say)
    result = scan(model, revision=revision, threshold=threshold, layers=layers, device=device, progress=progress,
                  as_frame=False, convention=convention)
    wanted, n_above = top_neurons(result.columns, top_k)
    if not wanted:
        raise UsageError("no neuron to export: --top-k is 0 or no neuron has a cosine")
    with open_circuit(model, revision=revision, convention=convention) as circuit:
        views = vocab_views(circuit, wanted, neuronpedia.MAX_LOGITS)
    mid = model_id or neuronpedia.model_id(name)
    files, rows = neuronpedia.batches(wanted, views, measured, mid, source_set)
    if not files:
        raise UsageError("no neuron has a top token in the corpus statistics: nothing to upload")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, body in files:
        with atomic_write(folder / fname) as fh:
            json.dump(body, fh, ensure_ascii=False, allow_nan=False)
        written.append(folder / fname)
    for k, row in enumerate(rows):
        row["flagged"] = k < n_above
    manifest = {"modelId": mid.lower(), "sourceSet": source_set, "name": name, "files": [f for f, _ in files],
                "neurons": rows, "scan": result.attrs["provenance"], "activations": measured.provenance.to_dict()}
    with atomic_write(folder / "manifest.json") as fh:
        json.dump(manifest, fh, ensure_ascii=False, indent=1, default=str)
    say(f"{sum(len(b['features']) for _, b in files)} features in {len(files)} batches "
        f"({n_above} flagged, {len(wanted) - n_above} below the threshold)")
    return written
