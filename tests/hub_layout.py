"""Laying out a local directory exactly like the huggingface_hub cache, for offline hub-id tests.

``huggingface_hub.hf_hub_download`` with ``HF_HUB_OFFLINE=1`` (or when the Hub cannot be reached)
resolves ``repo_id``/``filename``/``revision`` with no network by reading, under ``cache_dir``::

    models--{org}--{name}/
    ├── blobs/{etag}                          the file's bytes (sha256 for LFS files, git sha1 otherwise)
    ├── refs/{revision}                       the 40-hex commit hash the branch/tag points at (no newline)
    └── snapshots/{commit}/{filename}         a relative symlink to ../../blobs/{etag}

(see ``huggingface_hub.file_download._hf_hub_download_to_cache_dir``, ``repo_folder_name`` and
``_create_symlink``). :func:`make_hub_cache` builds that tree from a directory's files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable

# files the Hub stores through LFS by default (.gitattributes of a new model repo): their etag is
# the sha256 of the content; other files are plain git blobs whose etag is the git blob sha1
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".model")


def _etag(path: str, relative: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if relative.endswith(_LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_cache_dir(cache_dir: str | os.PathLike, repo_id: str) -> str:
    """``{cache_dir}/models--{org}--{name}``, as ``huggingface_hub.file_download.repo_folder_name`` names it."""
    return os.path.join(os.fspath(cache_dir), "--".join(["models", *repo_id.split("/")]))


def snapshot_of(source_dir: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """``(commit, {relative path: etag})`` of a directory's files as one hub commit: the commit hash is
    derived from the full content, the etags as the Hub computes them (sha256 for LFS files)."""
    source_dir = os.fspath(source_dir)
    files = sorted(os.path.relpath(os.path.join(root, name), source_dir).replace(os.sep, "/")
                   for root, _, names in os.walk(source_dir) for name in names)
    etags = {rel: _etag(os.path.join(source_dir, rel), rel) for rel in files}
    commit = hashlib.sha1("".join(f"{rel}\0{etags[rel]}\n" for rel in files).encode()).hexdigest()
    return commit, etags


def make_hub_cache(cache_dir: str | os.PathLike, repo_id: str, source_dir: str | os.PathLike, revision: str = "main",
                   *, files: Iterable[str] | None = None, symlinks: bool = True) -> str:
    """Puts ``source_dir``'s files (or only ``files``, paths relative to it) into a hub-like cache.

    Returns the snapshot directory ``{cache_dir}/models--{org}--{name}/snapshots/{commit}``. The
    commit hash is derived from the full content of ``source_dir``, so laying out a subset of the
    same directory again adds to the same snapshot, like downloading more files of one commit.
    With ``symlinks=False`` the snapshot holds copies (what huggingface_hub does where symlinks are
    not supported).
    """
    source_dir = os.fspath(source_dir)
    commit, etags = snapshot_of(source_dir)
    all_files = sorted(etags)

    wanted = all_files if files is None else sorted(files)
    unknown = sorted(set(wanted) - set(all_files))
    if unknown:
        raise FileNotFoundError(f"{source_dir} has no {unknown}")

    storage = repo_cache_dir(cache_dir, repo_id)
    blobs = os.path.join(storage, "blobs")
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(blobs, exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for rel in wanted:
        blob = os.path.join(blobs, etags[rel])
        if not os.path.exists(blob):
            shutil.copyfile(os.path.join(source_dir, rel), blob)
        pointer = os.path.join(snapshot, *rel.split("/"))
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        if os.path.lexists(pointer):
            os.remove(pointer)
        if symlinks:
            os.symlink(os.path.relpath(blob, os.path.dirname(pointer)), pointer)
        else:
            shutil.copyfile(blob, pointer)

    if revision != commit:  # a branch or tag: refs/{revision} holds the commit hash, without a newline
        ref = os.path.join(storage, "refs", *revision.split("/"))
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        with open(ref, "w") as f:
            f.write(commit)
    return snapshot


def remove_from_hub_cache(snapshot: str | os.PathLike, filename: str) -> None:
    """Deletes ``filename`` from a snapshot and its blob, as if it had never been downloaded."""
    pointer = os.path.join(os.fspath(snapshot), *filename.split("/"))
    blob = os.path.realpath(pointer)
    os.remove(pointer)
    if blob == os.path.abspath(pointer) or not os.path.exists(blob):
        return  # a copy, not a symlink
    snapshots = os.path.dirname(os.path.abspath(os.fspath(snapshot)))
    for root, _, names in os.walk(snapshots):
        if any(os.path.realpath(os.path.join(root, name)) == blob for name in names):
            return  # another file (same bytes) still points at this blob
    os.remove(blob)
