"""Strict JSONL reading and atomic writing, shared by every stage.

Reading rules (each violation stops the read with ``path:line: what is wrong``):

- the file is UTF-8; a UTF-8 byte-order mark is refused (it is invisible and usually means
  the file went through a tool that will also have changed other bytes);
- lines end with ``\\n``; a ``\\r\\n`` line end is refused for the same reason, naming the
  first such line; a missing final newline is accepted;
- every non-blank line is one JSON object; blank lines are refused (they usually mean a
  concatenation went wrong), except that a single trailing newline is fine;
- ``NaN``, ``Infinity`` and duplicate keys are refused;
- ``required`` fields must be present with the given type; ``id_field`` values must be
  unique within the file;
- an empty file is refused unless ``allow_empty=True``.

Writes go to a temporary file in the destination directory and are moved into place with
``os.replace``, so a killed process never leaves a half-written file under the final name.
A temporary left behind by a killed writer is removed by the next write of the same path.
A failed write (disk full, file-size limit, permissions) raises ``TunelineError`` naming
the path, and the previous file is left as it was. A written file or directory gets the
permissions of the one it replaces, or the umask's default for a new one.

Inside ``staged_outputs()`` (the CLI runs every stage in one) the moves into place are
deferred: every output the stage writes is staged beside its final name and all of them
are swapped in together when the stage returns, or all discarded when it fails, so a
failing stage leaves every previous output as it was. ``commit_staged()`` swaps in what
is staged so far (a training stage calls it before its other processes read the
outputs); ``write_now=True`` on a write bypasses staging (checkpoints, exit codes).
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tuneline.errors import InputError, TunelineError

TypeSpec = type | tuple[type, ...]


class RecordError(InputError):
    """A malformed record file; the message starts with ``path:line:``."""

    def __init__(self, path: str | Path, line: int, message: str):
        self.path = str(path)
        self.line = line
        self.reason = message
        super().__init__(f"{path}:{line}: {message}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (use null or a finite number)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def loads_strict(text: str) -> Any:
    """json.loads that refuses NaN/Infinity, duplicate keys, nesting too deep for the
    parser and escaped lone surrogates (which no UTF-8 file can hold); raises ValueError."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except RecursionError as exc:
        raise ValueError("nesting is too deep") from exc
    if "\\u" in text:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"escaped lone surrogate {exc.object[exc.start:exc.end]!r} is not valid Unicode") from exc
    return value


def _type_name(spec: TypeSpec) -> str:
    if isinstance(spec, tuple):
        return " or ".join(t.__name__ for t in spec)
    return spec.__name__


def _check_type(value: Any, spec: TypeSpec) -> bool:
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) and bool not in types:
        return False  # bool is an int subclass; never accept it for int/float fields
    return isinstance(value, types)


def iter_jsonl(
    path: str | Path,
    *,
    required: Mapping[str, TypeSpec] | None = None,
    id_field: str | None = "id",
    allow_empty: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL file, strictly (see module docstring)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: file not found") from exc
    if raw.startswith(b"\xef\xbb\xbf"):
        raise RecordError(path, 1, "starts with a UTF-8 byte-order mark; save the file as UTF-8 without BOM")
    if not raw.strip():
        if allow_empty:
            return
        raise RecordError(path, 1, "file is empty; expected one JSON object per line")
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    seen_ids: dict[Any, int] = {}
    for number, line_bytes in enumerate(lines, start=1):
        if line_bytes.endswith(b"\r"):
            raise RecordError(path, number, "CRLF line end; tuneline reads LF ('\\n') line ends only")
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError(path, number, f"invalid UTF-8 at byte {exc.start}") from exc
        if not line.strip():
            raise RecordError(path, number, "blank line; expected one JSON object per line")
        try:
            record = loads_strict(line)
        except ValueError as exc:
            raise RecordError(path, number, f"invalid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise RecordError(path, number, f"expected a JSON object, got {type(record).__name__}")
        for field, spec in (required or {}).items():
            if field not in record:
                raise RecordError(path, number, f"missing required field {field!r}")
            if not _check_type(record[field], spec):
                raise RecordError(
                    path,
                    number,
                    f"field {field!r} is {type(record[field]).__name__} "
                    f"{_short(record[field])}, expected {_type_name(spec)}",
                )
        if id_field is not None:
            if id_field not in record:
                raise RecordError(path, number, f"missing required field {id_field!r}")
            rid = record[id_field]
            if not isinstance(rid, str | int) or isinstance(rid, bool):
                raise RecordError(path, number, f"field {id_field!r} must be a string or integer, got {_short(rid)}")
            if rid in seen_ids:
                raise RecordError(path, number, f"duplicate {id_field} {rid!r} (first on line {seen_ids[rid]})")
            seen_ids[rid] = number
        yield record


def read_jsonl(
    path: str | Path,
    *,
    required: Mapping[str, TypeSpec] | None = None,
    id_field: str | None = "id",
    allow_empty: bool = False,
) -> list[dict[str, Any]]:
    """Read a whole JSONL file strictly; see :func:`iter_jsonl`."""
    return list(iter_jsonl(path, required=required, id_field=id_field, allow_empty=allow_empty))


def read_json(path: str | Path) -> Any:
    """Read one JSON document strictly (no NaN, no duplicate keys)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"{path}: file not found") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: invalid UTF-8 at byte {exc.start}") from exc
    try:
        return loads_strict(text)
    except json.JSONDecodeError as exc:
        raise RecordError(path, exc.lineno, f"invalid JSON: {exc.msg}") from exc
    except ValueError as exc:
        raise InputError(f"{path}: invalid JSON: {exc}") from exc


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dumps_line(record: Mapping[str, Any]) -> str:
    """One JSONL line: compact, UTF-8, no NaN, keys in insertion order."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class _Staged:
    """Outputs written inside ``staged_outputs()``, waiting to be swapped in together."""

    def __init__(self) -> None:
        self.moves: list[tuple[Path, Path]] = []  # (staged temp, final path), in write order

    def add(self, tmp: Path, path: Path) -> None:
        for i, (old_tmp, old_path) in enumerate(self.moves):
            if old_path == path:  # written twice: the later version wins
                _remove_path(old_tmp)
                del self.moves[i]
                break
        self.moves.append((tmp, path))

    def discard(self) -> None:
        for tmp, _ in self.moves:
            _remove_path(tmp)
        self.moves.clear()

    def commit(self) -> None:
        """Swap every staged output in; if a move fails, the ones already moved are put
        back as they were and every staged temp is removed."""
        done: list[tuple[Path, Path | None]] = []  # (final path, backup of what it replaced)
        try:
            for tmp, path in self.moves:
                backup = None
                if path.exists() or path.is_symlink():
                    backup = path.with_name(f".{path.name}.old")
                    _remove_path(backup)
                    if path.is_dir() and not path.is_symlink():
                        os.replace(path, backup)  # a directory cannot be replaced in one step
                    else:
                        os.link(path, backup, follow_symlinks=False)  # the final name stays
                try:
                    os.replace(tmp, path)
                except OSError:
                    if backup is not None:
                        os.replace(backup, path)
                    raise
                done.append((path, backup))
        except BaseException as exc:  # an interrupt mid-way too: all or nothing
            failed = path
            for path, backup in reversed(done):
                _remove_path(path)
                if backup is not None:
                    os.replace(backup, path)
            self.discard()
            if isinstance(exc, OSError):
                raise _write_error(failed, exc) from exc
            raise
        for _, backup in done:
            if backup is not None:
                _remove_path(backup)
        self.moves.clear()


_STAGED: contextvars.ContextVar[_Staged | None] = contextvars.ContextVar("tuneline_staged", default=None)


@contextlib.contextmanager
def staged_outputs() -> Iterator[None]:
    """Defer every atomic write in the body; swap them all in on success, drop them all
    on an exception (``KeyboardInterrupt`` included)."""
    staged = _Staged()
    token = _STAGED.set(staged)
    try:
        yield
    except BaseException:
        staged.discard()
        raise
    else:
        staged.commit()
    finally:
        _STAGED.reset(token)


def commit_staged() -> None:
    """Swap in the outputs staged so far (nothing outside ``staged_outputs()``)."""
    staged = _STAGED.get()
    if staged is not None:
        staged.commit()


def written(path: str | Path) -> Path:
    """Where the newest version of ``path`` is: its staged temp when this stage wrote it
    inside ``staged_outputs()`` (a stage hashing its own output), else ``path``."""
    path = Path(path)
    staged = _STAGED.get()
    for tmp, final in reversed(staged.moves if staged is not None else []):
        if final == path:
            return tmp
    return path


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode_for(path: Path, directory: bool) -> int:
    """The permissions a written ``path`` gets: those of what it replaces, else the
    umask's default (``mkstemp``/``mkdtemp`` create 0600/0700)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return (0o777 if directory else 0o666) & ~_umask()


_BUILDING: set[Path] = set()  # temp directories of atomic_dir() bodies in progress


def _place(tmp: Path, path: Path, write_now: bool) -> None:
    """Move ``tmp`` onto ``path`` now, or stage it; a file written into a directory that
    is itself being built (``atomic_dir``) goes in place at once: the directory is the
    output that gets staged."""
    staged = None if write_now else _STAGED.get()
    if staged is not None and _BUILDING.isdisjoint(path.resolve().parents):
        staged.add(tmp, path)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, write_now: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` atomically
    (inside ``staged_outputs()``, when the stage's outputs are committed).

    If the body raises, the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.with_name(f".{path.name}.old")
        for stale in [*path.parent.glob(f".{glob.escape(path.name)}.*.tmp"), old]:
            if stale.is_file() or stale.is_symlink():
                stale.unlink()  # left by a writer that was killed
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    tmp = Path(tmp_name)
    placed = False
    try:
        yield tmp
        os.chmod(tmp, _mode_for(path, directory=False))
        _place(tmp, path, write_now)
        placed = True
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        if not placed and tmp.exists():
            tmp.unlink()


def _write_error(path: Path, exc: OSError) -> TunelineError:
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return TunelineError(f"{path}: could not write{where}: {reason}; the previous version, if any, is unchanged")


def write_text(path: str | Path, text: str, *, write_now: bool = False) -> Path:
    """Atomically write UTF-8 text with LF line ends."""
    with atomic_path(path, write_now=write_now) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]], *, write_now: bool = False) -> int:
    """Atomically write records as JSONL; returns the number written."""
    count = 0
    with atomic_path(path, write_now=write_now) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            for record in records:
                handle.write(dumps_line(record))
                handle.write("\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
    return count


def write_json(path: str | Path, obj: Any, *, write_now: bool = False) -> Path:
    """Atomically write pretty, key-sorted JSON (stable diffs for metrics)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=2, sort_keys=True) + "\n"
    return write_text(path, text, write_now=write_now)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, write_now: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` (inside
    ``staged_outputs()``, when the stage's outputs are committed).

    The old directory (if any) is removed only after the new one is complete, so a killed
    process leaves either the previous directory or nothing under the final name.
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in [*path.parent.glob(f".{glob.escape(path.name)}.*.tmp"), old]:
            if stale.is_dir():
                shutil.rmtree(stale)  # left by a writer that was killed
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise _write_error(path, exc) from exc
    placed = False
    _BUILDING.add(tmp.resolve())
    try:
        yield tmp
        _BUILDING.discard(tmp.resolve())
        os.chmod(tmp, _mode_for(path, directory=True))
        if not write_now and _STAGED.get() is not None:
            _place(tmp, path, write_now)
        elif path.exists():
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        placed = True
    except OSError as exc:
        if old.is_dir() and not path.exists():
            os.replace(old, path)
        raise _write_error(path, exc) from exc
    finally:
        _BUILDING.discard(tmp.resolve())
        if not placed and tmp.exists():
            shutil.rmtree(tmp)
