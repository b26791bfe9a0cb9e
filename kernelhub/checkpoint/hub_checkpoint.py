"""Checkpoints named by a Hub id: `from_pretrained("org/name")` downloads them as transformers does.

`resolve_checkpoint` turns what a user passed into a local directory or .gguf file. A local
path that exists always wins; otherwise a string like `"org/name"` or `"org/name@revision"`
is a model repo on the Hugging Face Hub, downloaded into the Hugging Face cache through the
real `huggingface_hub` API (`snapshot_download`, `hf_hub_download`: its endpoint, token,
cache, progress bars and `HF_HUB_OFFLINE=1`).

Only the files kernelhub reads are fetched: config.json, the safetensors weights (the one
file, or the index and the shards it names), generation_config.json and the tokenizer files;
with `gguf_file=`, that one file. Nothing else is ever downloaded: remote code is never run
(a config's `auto_map` is ignored; `*.py` files stay on the Hub), and a `model_type` kernelhub
does not register fails as it does for a local checkpoint.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from pathlib import Path, PurePosixPath

from kernelhub.declare.errors import CheckpointError, KernelhubError, suggestion
from kernelhub.declare.log import _TRUE, PROGRESS_ENV

CONFIG_FILES = ("config.json",)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# what each caller reads: from_pretrained the model (and its tokenizer, so `run` needs one download),
# explain the config alone, load_tokenizer the tokenizer files
PARTS = {"model": CONFIG_FILES + WEIGHT_FILES + TOKENIZER_FILES, "config": CONFIG_FILES,
         "tokenizer": CONFIG_FILES + TOKENIZER_FILES}
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
HUB_IDS = 'Hub ids look like "org/name" or "org/name@revision"'


def resolve_checkpoint(path_or_id, *, revision: str | None = None, gguf_file: str | None = None,
                       token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                       local_files_only: bool = False, files: str = "model") -> Path:
    """A local checkpoint directory or .gguf file for `path_or_id`: an existing path, else a Hub id.

    `"org/name@v1"` and `revision="v1"` pick a branch, tag or commit; `gguf_file` names a .gguf
    file inside the repo (or inside a local directory). `token`, `cache_dir` and
    `local_files_only` are huggingface_hub's; `HF_HUB_OFFLINE=1` also means cached files only.
    `files` says what the caller reads: "model" (config, weights, generation config, tokenizer),
    "config" (explain) or "tokenizer". Only those files are downloaded: never code, which is
    never run. Every failure is one `CheckpointError` naming the repo and revision.

    >>> resolve_checkpoint("not a checkpoint")
    Traceback (most recent call last):
        ...
    kernelhub.declare.errors.CheckpointError: checkpoint path 'not a checkpoint' does not exist; ...
    >>> path = resolve_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct@main")   # doctest: +SKIP
    """
    if files not in PARTS:
        raise KernelhubError(f"files={files!r} is not a part of a checkpoint; valid: {', '.join(PARTS)}")
    if gguf_file is not None:
        _check_gguf_name(gguf_file)
    local = _local(path_or_id, gguf_file)
    if local is not None:
        return local
    repo_id, revision = split_hub_id(path_or_id, revision)
    from huggingface_hub.errors import EntryNotFoundError

    offline = local_files_only or _offline()
    with _quiet_bars():
        try:
            if gguf_file is not None:
                return Path(_download_file(repo_id, gguf_file, revision, token, cache_dir, offline))
            return _download_snapshot(repo_id, revision, PARTS[files], token, cache_dir, offline)
        except CheckpointError:
            raise
        except (OSError, ValueError, EntryNotFoundError) as e:  # huggingface_hub's, as one line naming the repo
            raise CheckpointError(_explain_failure(e, repo_id, revision, gguf_file, token, offline,
                                                   local_files_only, cache_dir)) from None


def split_hub_id(text: str, revision: str | None = None) -> tuple[str, str]:
    """(repo id, revision) of `"org/name"` or `"org/name@revision"`; `revision=` agrees or fills in.

    >>> split_hub_id("org/name@v1")
    ('org/name', 'v1')
    >>> split_hub_id("org/name", "v2")
    ('org/name', 'v2')
    """
    repo_id, at, rev = text.partition("@")
    if at and not rev:
        raise CheckpointError(f"{text!r} ends with '@' but names no revision; write \"{repo_id}@main\" "
                              "(a branch, tag or commit) or drop the '@'")
    if rev and revision is not None and rev != revision:
        raise KernelhubError(f"{text!r} names revision {rev!r} but revision={revision!r} was passed; "
                             "give the revision once")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise KernelhubError(f"revision={revision!r} is not a revision; pass a branch, tag or commit as a string")
    return repo_id, rev or revision or "main"


def is_hub_id(text) -> bool:
    """Whether `text` reads as a Hub model id (a str `org/name[@revision]`, not a .gguf path).

    >>> is_hub_id("org/name@v1"), is_hub_id("path/to/llama"), is_hub_id("model.gguf"), is_hub_id("./a/b")
    (True, False, False, False)
    """
    if not isinstance(text, str):
        return False
    repo_id = text.partition("@")[0]
    return (REPO_ID.fullmatch(repo_id) is not None and not repo_id.endswith((".gguf", ".git"))
            and ".." not in repo_id and "--" not in repo_id and not repo_id.startswith("."))


def _local(path_or_id, gguf_file) -> Path | None:
    """The local path `path_or_id` names, None for a Hub id; a clear error for neither."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise KernelhubError(f"a checkpoint is a path or a Hub id string; got {type(path_or_id).__name__} "
                             f"{path_or_id!r}")
    path = Path(path_or_id)
    if path.exists() or (not isinstance(path_or_id, str)) or not is_hub_id(path_or_id):
        if gguf_file is None:
            if not path.exists():
                what = "GGUF file" if path.suffix == ".gguf" else "checkpoint path"
                hint = ("; a GGUF file on the Hub is a repo id plus gguf_file=, e.g. (\"org/name\", "
                        "gguf_file=\"model.gguf\")" if path.suffix == ".gguf" else
                        f"; pass a checkpoint directory, a .gguf file or a Hub model id ({HUB_IDS})")
                raise CheckpointError(f"{what} {str(path_or_id)!r} does not exist{hint}")
            return path
        if not path.is_dir():
            why = "is not a directory" if path.exists() else f"does not exist; {HUB_IDS}"
            raise CheckpointError(f"gguf_file={gguf_file!r} names a file inside a directory or Hub repo, but "
                                  f"{str(path_or_id)!r} {why}")
        file = path / gguf_file
        if not file.is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise CheckpointError(f"GGUF file {str(file)!r} does not exist; .gguf files in {str(path)!r}: "
                                  f"{', '.join(found) or 'none'}.{suggestion(gguf_file, found)}".rstrip("."))
        return file
    return None


def _check_gguf_name(gguf_file) -> None:
    if not isinstance(gguf_file, str) or not gguf_file.endswith(".gguf"):
        raise KernelhubError(f"gguf_file={gguf_file!r} is not a .gguf file name; pass the name of a .gguf file "
                             "inside the repo, e.g. gguf_file=\"model-Q4_K_M.gguf\"")
    pure = PurePosixPath(gguf_file)
    if "\\" in gguf_file or pure.is_absolute() or ".." in pure.parts:
        raise KernelhubError(f"gguf_file={gguf_file!r} must be a relative path inside the repo (no '..', not "
                             "absolute)")


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


@contextlib.contextmanager
def _quiet_bars():
    """huggingface_hub's progress bars off while kernelhub's are (`-q`, HF_HUB_DISABLE_PROGRESS_BARS)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from kernelhub.declare.log import progress_disabled

    turn_off = (progress_disabled() and PROGRESS_ENV not in os.environ
                and not are_progress_bars_disabled("huggingface_hub"))
    if turn_off:
        disable_progress_bars("huggingface_hub")
    try:
        yield
    finally:
        if turn_off:
            enable_progress_bars("huggingface_hub")


def _download_file(repo_id, filename, revision, token, cache_dir, offline) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir,
                           local_files_only=offline)


def _download_snapshot(repo_id, revision, patterns, token, cache_dir, offline) -> Path:
    from huggingface_hub import snapshot_download

    def fetch(allow):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(allow), token=token,
                                      cache_dir=cache_dir, local_files_only=offline))

    folder = fetch(patterns)
    index = folder / "model.safetensors.index.json"
    if "model.safetensors" in patterns and index.is_file() and not (folder / "model.safetensors").is_file():
        from kernelhub.checkpoint.hf_layout import index_shards, shard_file

        shards = list(index_shards(index))  # names checked before any request: files inside the repo
        for shard in shards:
            shard_file(folder, shard, f"{repo_id}@{revision}: {index.name} names shard {shard!r}")
        folder = fetch([glob.escape(shard) for shard in shards])
    if offline and "model.safetensors" in patterns and not any(
            (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise FileNotFoundError(f"{folder} is incomplete: no weights")  # explain cached config.json alone
    if not (folder / "config.json").is_file():
        ggufs = [] if offline else _repo_files(repo_id, revision, token, ".gguf")
        hint = (f"; it holds GGUF files: pass gguf_file= one of {', '.join(ggufs)}" if ggufs else
                "; a checkpoint repo needs config.json and model.safetensors (or an index and its shards)")
        raise CheckpointError(f"Hub repo {repo_id!r} (revision {revision!r}) has no config.json{hint}")
    return folder


def _repo_files(repo_id, revision, token, suffix) -> list[str]:
    """The repo's files ending in `suffix` at `revision` (empty if they cannot be listed)."""
    from huggingface_hub import HfApi

    try:
        return sorted(f for f in HfApi(token=token).list_repo_files(repo_id, revision=revision) if f.endswith(suffix))
    except Exception:  # noqa: BLE001 - only a hint for an error message
        return []


def _explain_failure(error, repo_id, revision, gguf_file, token, offline, local_files_only, cache_dir) -> str:
    """One line saying why `repo_id@revision` (or its `gguf_file`) could not be had."""
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    where = f"{repo_id}@{revision}" + (f" file {gguf_file!r}" if gguf_file else "")
    if offline and isinstance(error, (LocalEntryNotFoundError, FileNotFoundError)):
        why = "local_files_only=True" if local_files_only else "offline (HF_HUB_OFFLINE=1)"
        partly = " (or only part of it)" if isinstance(error, FileNotFoundError) and "incomplete" in str(error) else ""
        return (f"{why}: Hub checkpoint {where} is not in the Hugging Face cache{partly} "
                f"({cache_dir or constants.HF_HUB_CACHE}); download it once online, or pass a local path")
    if isinstance(error, (HfHubHTTPError, EntryNotFoundError)) and not isinstance(error, LocalEntryNotFoundError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (None, 401, 403, 404) or isinstance(error, EntryNotFoundError):
            return _not_found(repo_id, revision, gguf_file, token)
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return (f"cannot download Hub checkpoint {where} from {constants.ENDPOINT} and it is not cached: "
            f"{type(error).__name__}: {first}")


def _not_found(repo_id, revision, gguf_file, token) -> str:
    """What is missing, the repo, its revision or its file, with what exists instead (one cheap request each)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        refs = api.list_repo_refs(repo_id)
    except Exception:  # noqa: BLE001 - the repo itself cannot be seen
        return (f"no model repo {repo_id!r} on the Hub (or it is private or gated: pass token= or run "
                f"`hf auth login`), and no local path of that name; {HUB_IDS}")
    names = [b.name for b in refs.branches] + [t.name for t in refs.tags]
    if revision not in names:
        try:
            api.repo_info(repo_id, revision=revision)  # a commit sha is no branch or tag but may exist
        except Exception:  # noqa: BLE001
            return (f"Hub repo {repo_id!r} has no revision {revision!r}; branches and tags: "
                    f"{', '.join(sorted(names)) or 'none'}.{suggestion(revision, names)}").rstrip(".")
    if gguf_file is not None:
        ggufs = _repo_files(repo_id, revision, token, ".gguf")
        return (f"Hub repo {repo_id!r} (revision {revision!r}) has no file {gguf_file!r}; its .gguf files: "
                f"{', '.join(ggufs) or 'none'}.{suggestion(gguf_file, ggufs)}").rstrip(".")
    return f"Hub repo {repo_id!r} (revision {revision!r}) could not be downloaded: a file it lists is missing"
