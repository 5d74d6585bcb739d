"""Atomic file output: write to a temporary name beside the target, rename on success.

Every writer of user-visible files goes through `atomic_path`, so an interrupted or failed run never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``final``'s folder; on normal exit it replaces ``final``, on error it is removed.

    The temporary file gets ordinary permissions (``0666`` minus the umask), not ``mkstemp``'s ``0600``.
    """
    final = Path(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, final)
    except OSError as error:  # a full disk, a lost permission: name the file the caller asked for
        tmp.unlink(missing_ok=True)
        if error.filename in (None, str(tmp), tmp_name):
            error.filename = str(final)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on normal exit it is renamed to ``final`` (which must not exist,
    its parent must), on error it is removed with its contents: ``final`` appears whole or not at all."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_current_umask())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(final: str | Path, text: str) -> None:
    """Write ``text`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files `atomic_path` left in ``folder`` when a process was killed while writing.

    Only call this when no other process writes into ``folder``. Returns the deleted paths.
    """
    removed = []
    for path in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask
