"""Safe writes: everything the tool writes is replaced atomically (temp file in the same folder,
fsync, rename), and files shared by concurrent runs are guarded by an advisory lock. csv_text is
the one CSV writer (a run's outcomes, a training's metrics)."""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Union

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


def not_a_file(path: PathLike) -> Optional[str]:
    """What stands at a file destination that cannot be replaced by a file: "a directory", "not a
    regular file" (a socket, a device...), or None (nothing, or a regular file)."""
    p = Path(path)
    if not p.exists() or p.is_file():
        return None
    return "a directory" if p.is_dir() else "not a regular file"


def check_not_directory(path: PathLike, what: str = "output") -> None:
    """Refuse a file destination where a directory is (before the work that would end in writing it)."""
    if Path(path).is_dir():
        raise AdvbenchError(f"{what} {path} is a directory, not a file: move it away or choose another path")


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


def csv_text(rows: Sequence[Mapping[str, Any]], float_format: Optional[str] = None,
             lineterminator: str = "\n") -> str:
    """``rows`` as CSV text: a header of every key in order of first appearance, then one line per
    row (a key a row lacks is left empty). ``float_format`` (e.g. "{:.6g}") formats the floats."""
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator=lineterminator)
    w.writeheader()
    for r in rows:
        w.writerow(r if float_format is None else
                   {k: (float_format.format(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


class LockBusy(AdvbenchError):
    """``locked(..., timeout=...)`` gave up: another process holds the lock."""


_HELD: dict = {}  # lock file -> nesting depth, for the locks this process holds


@contextlib.contextmanager
def locked(path: PathLike, timeout: Optional[float] = None,
           on_wait: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Exclusive advisory lock on ``path + '.lock'`` for the duration of the block.

    ``timeout``: None waits as long as it takes, 0 does not wait, t > 0 waits up to t seconds; when
    the lock stays held by another process it raises LockBusy. ``on_wait`` is called once when the
    lock is held by another process on arrival (e.g. to say that this one waits). A process that holds
    the lock may take it again (nested blocks). The lock file is removed on release; a process that
    locked a file removed meanwhile sees that (the path names another inode, or none) and retries."""
    lock_path = Path(str(path) + ".lock")
    key = os.path.abspath(lock_path)
    if key in _HELD:  # already ours
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    ensure_dir(lock_path.parent if str(lock_path.parent) else ".")
    deadline = None if timeout is None else time.monotonic() + timeout
    waited = False
    while True:
        fh = open(lock_path, "a")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockBusy(f"{path} is locked by another process (lock {lock_path} held)") from None
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                if deadline is None:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                else:
                    time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                    fh.close()
                    continue
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed it as we waited: lock the current file
                fh.close()
                continue
        except BaseException:
            fh.close()
            raise
        break
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still holding it (see above)
        fh.close()  # releases the lock
