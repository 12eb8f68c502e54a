"""Content digests: of adapter arrays, of training sets, of files and folders.

A digest names content, not a location: two adapters with the same arrays have the same
digest wherever they are stored, and one flipped byte in a base checkpoint changes its digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

import jax
import numpy as np

from jaxunlearn.data import Example
from jaxunlearn.parallel import host_array

__all__ = ["examples_digest", "file_sha256", "tree_digest"]


def tree_digest(tree, /) -> str:
    """SHA-256 of a pytree's arrays: each leaf's path, dtype, shape and bytes, in leaf order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = host_array(leaf)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def examples_digest(examples: Iterable[Example], /) -> str:
    """SHA-256 of a training set: every example's id and content hash, in order."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update((json.dumps([example.id, example.content_hash]) + "\n").encode())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike, /) -> str:
    """The SHA-256 hex digest of a file, or of a directory's files and their relative paths.

    For a directory, the digest covers every file below it, in sorted order of relative paths
    (with "/" separators), as (path, digest of contents) pairs; empty directories, permissions
    and times do not count. So the same files give the same digest on every platform.

    Raises:
        FileNotFoundError: If `path` does not exist.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return _contents_sha256(path)
    relative_paths = []
    for folder, _, names in os.walk(path):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), path)
            relative_paths.append(relative.replace(os.sep, "/"))
    digest = hashlib.sha256()
    for relative in sorted(relative_paths):
        contents = _contents_sha256(os.path.join(path, *relative.split("/")))
        # One JSON line per file: an unambiguous encoding whatever characters a name holds.
        digest.update((json.dumps([relative, contents], ensure_ascii=False) + "\n").encode())
    return digest.hexdigest()


def _contents_sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
