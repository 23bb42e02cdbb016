"""A text corpus from the Debian package ``python3.11-doc``: the reStructuredText sources of the Python 3.11
documentation (``_sources/**/*.rst.txt``, 497 files, about 11 MB of English prose, markup and code examples),
under the Python Software Foundation's licence (PSF License Agreement, the package's ``copyright`` file).

Nothing is downloaded: the files are read from ``/usr/share/doc/python3.11/html/_sources`` unless a directory
is given, or set in the environment variable ``PTSPARSE_PYTHON_DOCS_DIR``.

Split (:func:`split_of`), by file and fixed once for all: a file's path relative to ``_sources`` (POSIX
separators), hashed with CRC-32; ``crc32 % 20 == 0`` is test, ``== 1`` validation, the rest training (about
5% / 5% / 90%). A file added by a later package version leaves the other files' splits as they were. A split's
text (:func:`split_text`) is its files in sorted path order, each exactly as installed, joined by one blank line.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import zlib
from pathlib import Path

from ..errors import DataError

PACKAGE = "python3.11-doc"
LICENSE = "PSF-2.0 (Python Software Foundation License Agreement; /usr/share/doc/python3.11-doc/copyright)"
DEFAULT_DIR = Path("/usr/share/doc/python3.11/html/_sources")
ENV_VAR = "PTSPARSE_PYTHON_DOCS_DIR"
INSTALL_HINT = f"apt-get install {PACKAGE}"
SPLITS = ("train", "validation", "test")
SPLIT_RULE = "by file: crc32(path relative to _sources) % 20 == 0 -> test, == 1 -> validation, else train"
SEPARATOR = "\n\n"  # between two files of a split's text


def corpus_dir(root: str | os.PathLike | None = None) -> Path:
    """The ``_sources`` directory: ``root``, else the environment variable, else the package's place."""
    return Path(root or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def split_of(relative_path: str) -> str:
    """The split (``train``, ``validation``, ``test``) a file belongs to, from its path relative to ``_sources``."""
    bucket = zlib.crc32(relative_path.encode("utf-8")) % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def corpus_files(root: str | os.PathLike | None = None) -> list[str]:
    """The corpus files' paths relative to the ``_sources`` directory, sorted.

    Raises:
        DataError: the directory is missing or holds no ``.rst.txt`` file (the message names the install command).
    """
    directory = corpus_dir(root)
    files = sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*.rst.txt")
                   if path.is_file()) if directory.is_dir() else []
    if not files:
        raise DataError(f"Python documentation sources missing in {directory}; run: sudo {INSTALL_HINT} "
                        f"(or set {ENV_VAR})")
    return files


def split_files(split: str, root: str | os.PathLike | None = None) -> list[str]:
    """The sorted relative paths of one split's files.

    Raises:
        DataError: ``split`` is not one of :data:`SPLITS`, or the corpus is missing.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [name for name in corpus_files(root) if split_of(name) == split]


def read_file(relative_path: str, root: str | os.PathLike | None = None) -> str:
    """One corpus file's text (UTF-8).

    Raises:
        DataError: the file cannot be read.
    """
    path = corpus_dir(root) / relative_path
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from None


def split_text(split: str, root: str | os.PathLike | None = None) -> str:
    """A split's text: its files in sorted order joined by a blank line (:data:`SEPARATOR`)."""
    return SEPARATOR.join(read_file(name, root) for name in split_files(split, root))


def corpus_digest(root: str | os.PathLike | None = None) -> str:
    """SHA-256 over every file's relative path and bytes, in sorted order: which corpus a model was trained on."""
    digest = hashlib.sha256()
    for name in corpus_files(root):
        digest.update(name.encode("utf-8") + b"\0")
        digest.update((corpus_dir(root) / name).read_bytes() + b"\0")
    return digest.hexdigest()


def package_version() -> str | None:
    """The installed version of :data:`PACKAGE` (``dpkg-query``), or None where dpkg does not know it."""
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


__all__ = ["DEFAULT_DIR", "ENV_VAR", "INSTALL_HINT", "LICENSE", "PACKAGE", "SEPARATOR", "SPLITS", "SPLIT_RULE",
           "corpus_digest", "corpus_dir", "corpus_files", "package_version", "read_file", "split_files",
           "split_of", "split_text"]
