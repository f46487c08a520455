"""Hub inputs pinned to a commit: which commit of a hub model or dataset a stage reads, for loading and for DONE.

A hub model is written `org/name` or `org/name@<revision>` (a branch, a tag or a commit hash, as mergekit writes
a model reference; hub names cannot hold `@`), wherever a model is named: a stage's `model:`, a merge's
`models:` and `base:`, a transfer's sources. A hub dataset takes `revision:` on its data source. Without a
revision, `main` is meant. Either way the revision is resolved to its commit hash when the stage loads, and that
commit is what the stage's DONE records (posttrain.pipeline), so a hub input that moved upstream reruns the
stages that read it, and one that did not leaves them done.

Where the commit comes from:

* a model: huggingface_hub's `snapshot_download`, which asks the hub and downloads what is missing when the hub
  can be reached, and otherwise reads the local hub cache, laid out as::

      <HF_HUB_CACHE>/models--<org>--<name>/refs/<revision>        one line: the commit hash it points at
      <HF_HUB_CACHE>/models--<org>--<name>/snapshots/<commit>/    config.json, *.safetensors, tokenizer files

  The stage loads that snapshot folder (`from_pretrained`, lm-eval and the merge all get the same folder), so
  what is loaded is the commit DONE records. Online, a reference is asked once per process: every stage of a
  run sees one commit even if the hub moves during the run.
* a dataset: online, the hub's `dataset_info(revision).sha`, passed to `load_dataset(revision=...)`; offline,
  datasets loads the newest version in its own cache, `<HF_DATASETS_CACHE>/<org>___<name>/<config>/<version>/
  <commit>/` (datasets names that folder by the commit it was prepared from), so that commit is the identity, and
  a pinned `revision:` that is not that commit is refused (datasets itself would load the cached one silently).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

COMMIT = re.compile(r"^[0-9a-f]{40}$")
# The files a model stage reads from a hub snapshot: those the merge and transfer stages always downloaded, and
# a model's own code (`*.py`: loaded only with trust_remote_code, which models.check_remote_code gates). Top
# level only: from_pretrained reads no subfolder, and repos keep other formats there (`original/`), or as
# `consolidated*.safetensors` beside the HF weights (Mistral's), which would double the download.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
SKIPPED_FILES = ["*/*", "consolidated*"]
PICKLE_FILES = ["*.bin", "*.pt", "*.pth", "*.ckpt"]  # fetched only for a repo with no safetensors
_ONLINE: dict[tuple, str] = {}  # (repo type, name, revision) -> snapshot folder or commit, asked once per process


class PinError(ValueError):
    """A revision that cannot be resolved (one line; models and data wrap it in their own error)."""


def split_ref(ref: str) -> tuple[str, str | None]:
    """(`org/name`, revision) of `org/name@revision`; (ref, None) without `@`."""
    name, at, revision = ref.partition("@")
    return (name, revision) if at else (ref, None)


def cached_pin_problem(ref: str) -> str | None:
    """Why hub model `ref` cannot load at the revision it names, as far as names and the hub cache tell, without
    asking the hub: an empty revision, or, offline, a revision the hub cache does not hold. Else None."""
    name, revision = split_ref(ref)
    if revision is None:
        return None
    if not revision.strip():
        return f"model {ref!r}: empty revision after '@' (write {name}@<branch, tag or commit hash>)"
    commit = cached_commit(name, revision)
    if not _offline() or (commit and (_repo_folder(name, "model") / "snapshots" / commit / "config.json").is_file()):
        return None
    cached = cached_refs(name)
    return (f"model {ref!r}: revision {revision!r} is not in the hub cache, and HF_HUB_OFFLINE is set"
            + (f" (cached: {', '.join(cached)})" if cached else ""))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _repo_folder(name: str, repo_type: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type=repo_type)


def cached_commit(name: str, revision: str | None, repo_type: str = "model") -> str | None:
    """The commit `revision` (default `main`) points at in the local hub cache, or None; reads files only."""
    folder = _repo_folder(name, repo_type)
    revision = revision or "main"
    if COMMIT.match(revision):
        return revision if (folder / "snapshots" / revision).is_dir() else None
    try:
        return (folder / "refs" / revision).read_text().strip() or None
    except OSError:  # no such ref (or no such repo) in the cache
        return None


def cached_refs(name: str, repo_type: str = "model") -> list[str]:
    """The revision names the local hub cache holds for a repo (for messages)."""
    refs = _repo_folder(name, repo_type) / "refs"
    return sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []


def model_snapshot(ref: str, log: Callable[[str], None] = print) -> str:
    """The local snapshot folder (`.../snapshots/<commit>`) of hub model `ref` at the commit its revision points
    at now: asked of the hub and downloaded when the hub can be reached, else read from the hub cache. Raises
    PinError (one line) for a revision the hub or the cache does not have."""
    name, revision = split_ref(ref)
    key = ("model", name, revision)
    if key in _ONLINE and not _offline():
        return _ONLINE[key]
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f"revision {revision!r}" if revision else "its main revision"
    try:
        folder = snapshot_download(name, revision=revision, allow_patterns=MODEL_FILES, ignore_patterns=SKIPPED_FILES)
        if not _offline() and not any(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(name, revision=Path(folder).name, allow_patterns=MODEL_FILES + PICKLE_FILES,
                                       ignore_patterns=SKIPPED_FILES)
    except RevisionNotFoundError:
        raise PinError(f"model {ref!r}: the hub has no {at} of {name!r}") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise PinError(f"model {ref!r}: the hub refused {name!r} ({type(e).__name__})") from None
    except (LocalEntryNotFoundError, IncompleteSnapshotError):
        cached = cached_refs(name)
        where = "HF_HUB_OFFLINE is set" if _offline() else "the hub cannot be reached"
        raise PinError(f"model {ref!r}: {at} is not in the hub cache, and {where}"
                       + (f" (cached: {', '.join(cached)})" if cached else "")) from None
    if not _offline():
        _ONLINE[key] = folder
    return folder


def snapshot_identity(folder: str | Path) -> str | None:
    """`hub:<org>/<name>@<commit>` for a snapshot folder of the hub cache, else None (a folder of one's own)."""
    from huggingface_hub import constants

    path = Path(folder)
    try:
        rel = path.resolve().relative_to(Path(constants.HF_HUB_CACHE).resolve())
    except (ValueError, OSError):
        return None
    parts = rel.parts
    if len(parts) != 3 or parts[1] != "snapshots" or not parts[0].startswith("models--"):
        return None
    return f"hub:{parts[0].removeprefix('models--').replace('--', '/')}@{parts[2]}"


# ------------------------------------------------------------------------------------------------ datasets


def prepared_commit(name: str, subset: str | None) -> str | None:
    """The commit of the newest version of hub dataset `name` in datasets' own cache (what `load_dataset` reads
    offline: datasets.packaged_modules.cache picks the newest `<config>/<version>/<commit>` folder), or None."""
    import datasets.config
    from datasets.naming import camelcase_to_snakecase

    *org, last = name.split("/")
    root = Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join([*org, camelcase_to_snakecase(last)])
    found = [p for p in root.glob(f"{subset or '*'}/*/*") if p.is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime).name if found else None


def _datasets_offline() -> bool:
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def dataset_commit(name: str, subset: str | None, revision: str | None,
                   log: Callable[[str], None] = print) -> str | None:
    """The commit of hub dataset `name` a load reads now (see the module docstring); None when nothing is known
    (offline and not cached: the load then fails and names the dataset). Raises PinError for a revision the hub
    does not have, or, offline, one that is not the version cached here."""
    key = ("dataset", name, revision)
    if key in _ONLINE and not _datasets_offline():
        return _ONLINE[key]
    if not _datasets_offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

        try:
            commit = HfApi().dataset_info(name, revision=revision, timeout=30).sha
        except RevisionNotFoundError:
            raise PinError(f"dataset {name!r}: the hub has no revision {revision!r}") from None
        except (HfHubHTTPError, OSError) as e:  # unreachable or refused: as datasets, fall back to its cache
            log(f"data: the hub did not answer for {name!r} ({type(e).__name__}); using the cached version")
        else:
            _ONLINE[key] = commit
            return commit
    problem = dataset_pin_problem(name, subset, revision)
    if problem:
        raise PinError(problem)
    return prepared_commit(name, subset)


def dataset_pin_problem(name: str, subset: str | None, revision: str | None) -> str | None:
    """Offline only (reads caches): why a pinned `revision` of hub dataset `name` cannot be what datasets loads
    here (its cached version is another commit), else None. Online, the hub answers for the revision."""
    if revision is None or not _datasets_offline():
        return None
    cached = prepared_commit(name, subset)
    if cached is None:
        return None  # not cached at all: the load fails and says so
    wanted = revision if COMMIT.match(revision) else cached_commit(name, revision, "dataset")
    if wanted == cached:
        return None
    known = f" ({revision} is {wanted[:12]})" if wanted else ""
    return (f"revision {revision!r} of dataset {name!r} is not the version cached here (commit {cached[:12]}){known}, "
            "and HF_HUB_OFFLINE is set")


def dataset_identity(src) -> str:
    """`hub:<name>@<commit>:<subset>:<split>` of a hub data source (posttrain.data.DataSource)."""
    return f"hub:{src.source}@{dataset_commit(src.source, src.subset, src.revision, lambda m: None)}:{src.subset}:{src.split}"


def load_hub_dataset(src, log: Callable[[str], None] = print):
    """The rows of hub data source `src` at the commit `dataset_commit` resolves: a `datasets.Dataset`, or with
    `streaming: true` an IterableDataset read row by row (so the caller's `limit` stops the download too)."""
    from datasets import load_dataset

    commit = dataset_commit(src.source, src.subset, src.revision, log)
    try:
        return load_dataset(src.source, src.subset, split=src.split, revision=commit or src.revision,
                            streaming=src.streaming)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the user needs one line
        raise PinError(f"dataset {src.source!r} (split {src.split!r}) could not be loaded: "
                       f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None


def source_pin_problem(src, local: bool) -> str | None:
    """What is wrong with a data source's `revision:`/`streaming:` given its other fields, as `<field>: why`:
    either on a world task or local file (`local`), or streaming with `fraction`/`rows` but no `limit`."""
    for field in ("revision", "streaming"):
        if getattr(src, field) and local:
            return f"{field}: only hub datasets have it; {src.source} is a world task or a local file"
    share = "fraction" if src.fraction is not None else "rows" if src.rows is not None else None
    if src.streaming and share and src.limit is None:  # sampling holds every row read: bound them first
        return (f"{share}: a streamed source is sampled from the rows read, which are unbounded without limit; "
                "set limit: N to sample from its first N rows, or drop streaming")
    return None
