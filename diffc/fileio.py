"""Writing files so that a failure leaves nothing half-written."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError

# What diffc writes images as, by the file's suffix (``GenerationOutput.save``, ``diffc run --output``), and videos
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
VIDEO_SUFFIXES = (".mp4",)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The rename is atomic on one filesystem: readers see the old file or the whole new one, and if
    ``write`` raises, the temporary file is removed and ``path`` is untouched. An ``OSError`` (a full
    disk, a read-only or missing directory) becomes :class:`~diffc.errors.OutputError`, one line naming
    ``path`` and the OS reason.
    """
    path = Path(path)
    try:
        special = _is_special(path)  # a device or FIFO: the temporary file goes to the temp dir
        fd, tmp = tempfile.mkstemp(dir=None if special else path.parent, prefix=temporary_prefix(path.stem),
                                   suffix=path.suffix)
    except OSError as exc:
        raise OutputError(str(path), os_reason(exc)) from None
    os.close(fd)
    try:
        write(Path(tmp))
        if special:  # /dev/null, a FIFO, /dev/stdout: stream into it, never replace the node
            with open(tmp, "rb") as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            return path
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except OutputError as exc:  # from a nested atomic_write on ``tmp`` (write_video's own): name ``path``
        raise OutputError(str(path), exc.reason, exc.field) from None
    except OSError as exc:
        raise OutputError(str(path), os_reason(exc)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def temporary_prefix(name: str) -> str:
    """The prefix of a temporary file or folder written beside ``name``: a dot, at most 64 bytes of ``name``, a dot
    (``mkstemp``/``mkdtemp`` add 8 characters: all of a name near the file system's 255 bytes would not fit)."""
    return "." + name.encode()[:64].decode(errors="ignore") + "."


def shown_path(path: str | Path) -> str:
    """``path`` for an error line: at most 200 characters of it (a name too long for the file system is longer)."""
    text = str(path)
    return text if len(text) <= 200 else text[:200] + "..."


def name_too_long(path: Path) -> str | None:
    """Why the file system cannot take ``path``'s last name (the OS's words), or None: asked of the nearest folder
    that exists, so a name is refused before the folders above it are made."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no limit reported
        return None
    size = len(os.fsencode(path.name))
    return f"{os.strerror(errno.ENAMETOOLONG)} ({size} bytes; this file system takes {limit})" if size > limit else None


def _is_special(path: Path) -> bool:
    """``path`` exists and is not a regular file or a link to one (a device, a FIFO, a socket)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def os_reason(exc: OSError) -> str:
    """The OS's words for ``exc`` (``No space left on device``), without Python's ``[Errno N]`` prefix."""
    return exc.strerror or str(exc) or type(exc).__name__


def cache_dir() -> Path:
    """diffc's cache folder: ``$DIFFC_CACHE``, else ``$XDG_CACHE_HOME/diffc``, else ``~/.cache/diffc``."""
    if os.environ.get("DIFFC_CACHE"):
        return Path(os.environ["DIFFC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffc"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once at import: os.umask is process-wide, so not touched while threads write
