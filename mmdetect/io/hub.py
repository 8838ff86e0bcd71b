"""Hub ids: exactly the files a command needs, through huggingface_hub's cache (so a cached model works offline).

* :func:`weights` — ``config.json`` and ONE weight format (safetensors before ``pytorch_model.bin``; for a sharded
  index, the shards it names, after each name is checked as a plain name inside the repository): what ``scan``,
  ``heads`` and ``chains`` read.
* :func:`tokenizer` — the tokenizer files and ``generation_config.json`` of the same commit: what ``explain`` and
  ``scan --verify`` add.

Both go through ``snapshot_download(allow_patterns=...)``, which downloads the files in parallel, resumes interrupted
downloads and takes the cache's file locks; a branch or tag is resolved to its commit once and that commit is used
for everything after, so weights and tokenizer never come from two commits. Both return the snapshot folder, which is
then read like any local folder. :func:`offline` is the one place ``HF_HUB_OFFLINE`` is read.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from mmdetect.errors import CorruptInputError, MMDetectError, NotFoundError, UnsupportedError
from mmdetect.io.paths import member, read_json

CONFIG = "config.json"
# (index, single file) per weight format, in the order a checkpoint is read: safetensors first.
WEIGHT_FORMATS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))
WEIGHT_PATTERNS = tuple(name for pair in WEIGHT_FORMATS for name in pair)
# What a tokenizer can be made of (fast, SentencePiece, BPE, WordPiece) and the generation settings (BOS/EOS ids).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
                   "generation_config.json")


def is_hub_id(ref: str) -> bool:
    return re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", ref) is not None and ".." not in ref.split("/")


def is_commit(name: str) -> bool:
    """A snapshot folder named by its commit sha (the HF cache's layout)."""
    return re.fullmatch(r"[0-9a-f]{40}", name) is not None


def offline() -> bool:
    """HF_HUB_OFFLINE is set: from the environment, or as huggingface_hub read it when it was imported."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(constants.HF_HUB_OFFLINE)


def literal(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``: ``*``, ``?`` and ``[`` in a file name match only themselves."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _snapshot(repo_id: str, revision: str | None, patterns: Iterable[str]) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` with whichever files matching ``patterns`` the repo has
    (downloaded now, or already in the cache); huggingface_hub's errors become MMDetectErrors."""
    try:
        import huggingface_hub
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover
        raise UnsupportedError("huggingface_hub is not installed: pip install huggingface_hub") from exc
    where = f"hub id {repo_id!r} (revision {revision or 'main'})"
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns),
                                                   local_files_only=offline())
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise NotFoundError(f"{where} was not found: check the name and revision, and log in for gated "
                            f"models") from exc
    except LocalEntryNotFoundError as exc:
        if offline():
            raise NotFoundError(f"{repo_id} (revision {revision or 'main'}) is not in the local HF cache and "
                                f"HF_HUB_OFFLINE=1 is set: download it once online, or unset HF_HUB_OFFLINE") from exc
        raise NotFoundError(f"could not reach the hub for {repo_id}, and it is not in the local HF cache; set "
                            f"HF_HUB_OFFLINE=1 to use only the cache") from exc
    except MMDetectError:
        raise
    except Exception as exc:  # network errors and the like
        raise NotFoundError(f"could not fetch {repo_id} from the hub ({type(exc).__name__}: {exc}); set "
                            f"HF_HUB_OFFLINE=1 to use the local cache") from exc
    return Path(folder)


def _repo_files(repo_id: str, commit: str) -> set[str] | None:
    """The repository's file names at ``commit``, from the listing huggingface_hub caches when it resolves a commit
    online; None when there is no such listing (then each weight format is asked for in turn)."""
    try:
        from huggingface_hub import get_cached_repo_tree

        return {f.path for f in get_cached_repo_tree(repo_id, revision=commit)}
    except Exception:  # no cached listing (an older cache, a hand-made one)
        return None


def weights(repo_id: str, revision: str | None) -> Path:
    """The snapshot folder holding ``repo_id``'s config.json and one weight format (downloaded, or from the cache)."""
    if not is_hub_id(repo_id):
        raise NotFoundError(f"{repo_id!r} is neither an existing path nor a valid hub id (owner/name)")
    snapshot = _snapshot(repo_id, revision, (CONFIG, *(index for index, _ in WEIGHT_FORMATS)))
    commit = snapshot.name  # resolved once: every later fetch asks for this commit
    where = "in the local HF cache" if offline() else "in the repo"
    if not (snapshot / CONFIG).is_file():
        if offline():
            raise NotFoundError(f"{repo_id} is not in the local HF cache and HF_HUB_OFFLINE=1 is set: download "
                                f"it once online, or unset HF_HUB_OFFLINE")
        raise UnsupportedError(f"hub repo {repo_id} has no config.json: it is not a transformers checkpoint")
    listed = _repo_files(repo_id, commit)
    for index, single in WEIGHT_FORMATS:
        if (snapshot / index).is_file():
            shards = _shard_names(snapshot / index, repo_id)
            snapshot = _snapshot(repo_id, commit, [literal(n) for n in shards])
            for name in shards:
                if not (snapshot / name).is_file():
                    raise NotFoundError(f"shard {name} of {repo_id} is not {where}"
                                        + (" and HF_HUB_OFFLINE=1 is set: download it once online" if offline()
                                           else f" although {index} names it"))
            return snapshot
        if listed is None or single in listed:
            snapshot = _snapshot(repo_id, commit, [single])
            if (snapshot / single).is_file():
                return snapshot
    raise NotFoundError(f"no weights for {repo_id} {where} (looked for {', '.join(WEIGHT_PATTERNS)})")


def _shard_names(index: Path, repo_id: str) -> list[str]:
    """The shard names of a weight index, each checked as a plain name inside the repository before it reaches the
    downloader."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
        raise CorruptInputError(f"{index.name} of {repo_id} has no weight_map of file names: it is not a valid "
                                f"index")
    for name in weight_map.values():
        member(index.parent, name, index)
    return sorted(set(weight_map.values()))


def tokenizer(repo_id: str, revision: str | None) -> Path:
    """The snapshot folder with ``repo_id``'s tokenizer files and generation config at ``revision`` (pass the
    commit the weights came from); the files the repo does not have are simply absent."""
    return _snapshot(repo_id, revision, (CONFIG, *TOKENIZER_FILES))


TRANSCODER_REF = re.compile(r"(?P<repo>[\w.\-]+/[\w.\-]+)(?:@(?P<rev>[\w.\-/]+?))?(?::(?P<sub>[\w.\-/]*))?")


def parse_transcoder_ref(ref: str) -> tuple[str, str | None, str] | None:
    """``owner/name[@revision][:subfolder]`` -> (repo id, revision, subfolder); None when ``ref`` is not of that
    form. The subfolder is checked as a plain relative path (no ``..``, no leading ``/``)."""
    m = TRANSCODER_REF.fullmatch(ref)
    if m is None:
        return None
    sub = (m.group("sub") or "").strip("/")
    if sub and any(part in ("", ".", "..") for part in sub.split("/")):
        return None
    return m.group("repo"), m.group("rev"), sub


def transcoder(repo_id: str, revision: str | None, subfolder: str) -> Path:
    """The folder of a SAELens transcoder (``cfg.json`` + ``sae_weights.safetensors``), or of a set of them one
    level down, at ``subfolder`` of ``repo_id``: only those files are fetched (or found in the cache)."""
    prefix = f"{literal(subfolder)}/" if subfolder else ""
    names = ("cfg.json", "sae_weights.safetensors")
    snapshot = _snapshot(repo_id, revision, [prefix + n for n in names] + [prefix + "*/" + n for n in names])
    folder = snapshot / subfolder if subfolder else snapshot
    if not folder.is_dir():
        where = "in the local HF cache" if offline() else "in the repo"
        raise NotFoundError(f"{repo_id} has no transcoder at {subfolder or 'its top level'} {where}: give the "
                            f"subfolder holding cfg.json, e.g. {repo_id}:layer_3")
    return folder
