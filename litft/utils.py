"""Small shared helpers: atomic file and directory writes, a one-line error type for the CLI, class signatures and
config serialisation."""
from __future__ import annotations

import ctypes
import errno
import inspect
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


class LitftError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it onto `path` only if the block succeeds.

    So a crash or an error never leaves a half-written file where a reader expects a whole one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the content reaches the disk before the name does: a power cut leaves old or new
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file should get the usual permissions
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# -- directories, replaced so that a complete one exists at every instant --------------------------
class SaveError(LitftError):
    """Writing a directory failed (disk full, a write error): the previous one, if any, is intact."""

    def __init__(self, target: Path, error: OSError) -> None:
        self.target, self.error = target, error
        what = "disk full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "write error"
        super().__init__(f"{what} while writing {target} ({error.strerror or error})")


def tmp_dir_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp")


def backup_dir_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_dir(target: Path) -> None:
    """Finish a replacement that the portable fallback of `write_dir_atomically` left half-way (a kill between
    its two renames): the complete previous directory waits under the backup name; put it back."""
    backup = backup_dir_name(target)
    if backup.is_dir() and not target.exists():
        os.rename(backup, target)
        fsync_dir(target.parent)


def write_dir_atomically(target: Path | str, write: Callable[[Path], None], replaceable: set[str] | None = None) -> Path:
    """`write(tmp)` fills a temp directory next to `target`, which then replaces `target` so that at every instant
    either the complete old or the complete new directory is there (a kill -9 or a power cut included).

    Linux: renameat2(RENAME_EXCHANGE) swaps the two in one step, then the old one is deleted. Elsewhere (or on a
    filesystem without it): old -> backup name, new -> target, delete backup; `recover_dir` undoes a stop between
    the two renames. Files are fsynced before the swap. A write error (e.g. a full disk) removes the temp directory,
    leaves `target` as it was, and becomes a `SaveError`. With `replaceable` (the names an earlier output of the same
    kind holds), an existing `target` holding anything else is refused: never replace a user's other files.
    """
    target = Path(target)
    if replaceable is not None and target.exists():
        others = sorted(p.name for p in target.iterdir()) if target.is_dir() else [target.name]
        others = [n for n in others if n not in replaceable]
        if others:
            raise LitftError(f"{target} exists and holds other files ({', '.join(others[:3])}); choose a new or empty "
                             "out_dir")
    tmp = tmp_dir_name(target)
    try:
        recover_dir(target)
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a killed run
        tmp.mkdir(parents=True)
        write(tmp)
        fsync_tree(tmp)
        if target.exists():
            if not _exchange(tmp, target):
                backup = backup_dir_name(target)
                shutil.rmtree(backup, ignore_errors=True)
                os.rename(target, backup)
                os.rename(tmp, target)
                fsync_dir(target.parent)
                shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)
    except Exception as e:  # noqa: BLE001 -- sorted below: write errors become SaveError, the rest passes
        error = None if isinstance(e, LitftError) else write_error_of(e, tmp.parent)
        if error is None:
            raise
        raise SaveError(target, error) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the partial new one, or the old one after a swap
    return target


def write_error_of(e: BaseException, where: Path) -> OSError | None:
    """The OSError behind an exception raised while writing, if it is one. torch.save and safetensors report a full
    disk as their own errors (a RuntimeError with the OSError as its context; "... (os error 28)")."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        code = re.search(r"\(os error (\d+)\)", str(seen))
        if code:
            return OSError(int(code[1]), os.strerror(int(code[1])))
        seen = seen.__cause__ or seen.__context__
    try:
        st = os.statvfs(where)
        if st.f_bavail * st.f_frsize < 1 << 20:  # what a write that found no space leaves behind
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except (OSError, AttributeError):  # no statvfs (Windows)
        pass
    return None


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # this filesystem cannot: fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_dir(d: Path | str) -> None:
    """Make a directory's entries (renames, new files) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # some filesystems refuse fsync on a directory
            raise
    finally:
        os.close(fd)


def fsync_tree(d: Path) -> None:
    """fsync every file and directory under `d` (and `d`), so its content survives a power cut."""
    for root, _, files in os.walk(d):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


# -- signatures and config serialisation (the CLI's options, run configs) ---------------------------
def function_docs(fn: Any) -> dict[str, str]:
    """Argument name -> its description in `fn`'s Google-style docstring."""
    import docstring_parser

    doc = inspect.getdoc(fn) or ""
    if doc.startswith("Args:"):  # the Google-style parser needs a summary line first
        doc = "-\n\n" + doc
    return {p.arg_name: p.description or "" for p in docstring_parser.parse(doc).params}


def init_parameters(cls: type) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """Init parameters of a class and its bases (following `**kwargs` up the MRO), and their docs: what
    `litft finetune <method>` offers as options, and what a run directory's init_args are checked against."""
    params: dict[str, inspect.Parameter] = {}
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__, eval_str=True)
        for p in list(sig.parameters.values())[1:]:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in params:
                continue
            params[p.name] = p.replace(kind=p.KEYWORD_ONLY)
        for k, v in function_docs(klass.__init__).items():
            docs.setdefault(k, v)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    # required (no default) first, so the combined signature is valid
    ordered = sorted(params.values(), key=lambda p: p.default is not inspect.Parameter.empty)
    return ordered, docs


def init_args_of(obj: Any) -> dict[str, Any]:
    """An object's init args, read back from its attributes of the same names."""
    params, _ = init_parameters(type(obj))
    return {p.name: getattr(obj, p.name) for p in params if hasattr(obj, p.name)}


def to_yaml_value(value: Any) -> Any:
    """`value` as plain YAML data, in the layout jsonargparse reads back (objects as class_path + init_args).

    Not jsonargparse's own `parser.dump`: that serialises a parsed Namespace, and a run started from Python
    (`finetune(LoRA(...), data=JSON(...))`) has no parser and no Namespace, only live objects; this turns those
    objects back into what the parser would have produced, so both entry points write the same config.yaml."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value):
        return {k: to_yaml_value(v) for k, v in asdict(value).items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple, set)):
        return [to_yaml_value(v) for v in value]
    if isinstance(value, dict):
        return {k: to_yaml_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"class_path": f"{type(value).__module__}.{type(value).__qualname__}",
            "init_args": to_yaml_value(init_args_of(value))}
