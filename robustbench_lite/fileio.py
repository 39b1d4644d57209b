"""Safe writes: everything the tool writes is replaced atomically (temp file in the same folder,
fsync, rename), and files shared by concurrent runs are guarded by an advisory lock."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Union

from .errors import AdvbenchError

PathLike = Union[str, os.PathLike]


def ensure_dir(path: PathLike) -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdvbenchError(f"cannot create directory {p}: {exc.strerror or exc}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise AdvbenchError(f"directory {p} is not writable")
    return p


def atomic_write(path: PathLike, writer: Callable[[object], None], binary: bool = True) -> None:
    """Call ``writer(fileobj)`` on a temp file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    ensure_dir(path.parent if str(path.parent) else ".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


@contextlib.contextmanager
def locked(path: PathLike) -> Iterator[None]:
    """Exclusive advisory lock on ``path + '.lock'`` for the duration of the block."""
    import fcntl

    lock_path = Path(str(path) + ".lock")
    ensure_dir(lock_path.parent if str(lock_path.parent) else ".")
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
