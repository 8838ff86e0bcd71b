"""Hub ids: config.json and the weight files only, through the Hugging Face cache (so a cached model works offline).

The snapshot folder is then opened like any local folder. Shard names in a downloaded index are checked as plain names
inside the repository before anything is fetched by them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from mmdetect.errors import CorruptInputError, MMDetectError, NotFoundError, UnsupportedError
from mmdetect.io.paths import member, read_json

WEIGHT_PATTERNS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin")


def is_hub_id(ref: str) -> bool:
    return re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", ref) is not None and ".." not in ref.split("/")


def is_commit(name: str) -> bool:
    """A snapshot folder named by its commit sha (the HF cache's layout)."""
    return re.fullmatch(r"[0-9a-f]{40}", name) is not None


def download(repo_id: str, revision: str | None) -> Path:
    """The snapshot folder holding ``repo_id``'s config.json and weights (downloaded, or found in the cache)."""
    if not is_hub_id(repo_id):
        raise NotFoundError(f"{repo_id!r} is neither an existing path nor a valid hub id (owner/name)")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, \
            RevisionNotFoundError
    except ImportError as exc:  # pragma: no cover
        raise UnsupportedError("huggingface_hub is not installed: pip install huggingface_hub") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except EntryNotFoundError:
            return None
        except LocalEntryNotFoundError:
            if offline:
                return None
            raise
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise NotFoundError(f"hub id {repo_id!r} (revision {revision or 'main'}) was not found: check the name "
                                f"and revision, and log in for gated models") from exc

    try:
        config = fetch("config.json")
        if config is None:
            if offline:
                raise NotFoundError(f"{repo_id} is not in the local HF cache and HF_HUB_OFFLINE=1 is set: download "
                                    f"it once online, or unset HF_HUB_OFFLINE")
            raise UnsupportedError(f"hub repo {repo_id} has no config.json: it is not a transformers checkpoint")
        for pattern in WEIGHT_PATTERNS:
            found = fetch(pattern)
            if found is None:
                continue
            if pattern.endswith(".index.json"):
                index = read_json(found)
                weight_map = index.get("weight_map") if isinstance(index, dict) else None
                if not isinstance(weight_map, dict):
                    raise CorruptInputError(f"{pattern} of {repo_id} has no weight_map: it is not a valid index")
                for name in weight_map.values():
                    member(found.parent, name, found)  # before the name reaches the downloader
                for name in sorted(set(weight_map.values())):
                    if fetch(name) is None:
                        raise NotFoundError(f"shard {name} of {repo_id} is not in the local HF cache and "
                                            f"HF_HUB_OFFLINE=1 is set: download it once online")
            return config.parent
        where = "in the local HF cache" if offline else "in the repo"
        raise NotFoundError(f"no weights for {repo_id} {where} (looked for {', '.join(WEIGHT_PATTERNS)})")
    except MMDetectError:
        raise
    except Exception as exc:  # network errors and the like
        raise NotFoundError(f"could not fetch {repo_id} from the hub ({type(exc).__name__}: {exc}); set "
                            f"HF_HUB_OFFLINE=1 to use the local cache") from exc
