"""The folders the daemon needs on disk: made when missing, compared by identity, and the
words an OSError about one is reported in."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import structlog

from syncpro.config.model import Dirs

log = structlog.get_logger()

DATA_DIRS = ("remotecomdir", "updatedir", "softdir", "configuredir")


def make_data_dirs(dirs: Dirs) -> None:
    """Make each of the data dirs that is missing, with a warning naming it: a typo in the
    config would otherwise create, and watch, an empty tree in silence. Raise OSError if one
    cannot be made."""
    for key in DATA_DIRS:
        path: Path = getattr(dirs, key)
        if not path.is_dir():
            if os.path.lexists(path):
                # mkdir would say "File exists", which reads as if all were well.
                raise NotADirectoryError(
                    errno.ENOTDIR,
                    f"dirs.{key} is not a directory (a file is in the way)",
                    str(path),
                )
            path.mkdir(parents=True, exist_ok=True)
            log.warning("service.dir_created", key=f"dirs.{key}", path=str(path))


def same_dir(a: Path, b: Path) -> bool:
    """Whether two paths name one directory: a second lock of our own state would be
    refused as another daemon's."""
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False


def os_error(exc: OSError) -> str:
    """Given an OSError, return its reason and the path it concerns, without the errno."""
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"
