"""Small shared helpers: config dataclasses from dicts, a progress bar, seeding, and writing
files so that a reader never sees half of one and nothing is replaced by accident."""

import dataclasses
import os
import secrets
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def config_from_dict(cls, d: dict, renames: dict | None = None, **overrides):
    """Build dataclass `cls` from the known fields of `d` (unknown keys are ignored).

    `renames` maps a key of `d` to a field name. The dict is never modified.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        key = (renames or {}).get(key, key)
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    kwargs.update(overrides)
    return cls(**kwargs)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress_enabled(flag=None) -> bool:
    """Progress bars are on unless switched off by argument or MINIGNEXT_PROGRESS=0."""
    if flag is not None:
        return bool(flag)
    return os.environ.get("MINIGNEXT_PROGRESS", "1") != "0"


class progress:
    """A dependency-free progress bar for loops: `for x in progress(xs, desc="sampling"):`.

    Writes one updating line to stderr; `enabled=False` turns it into a plain iterator.
    """

    def __init__(self, iterable=None, total=None, desc="", enabled=None, every=0.1):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.enabled, self.every = desc, progress_enabled(enabled), every
        self.n, self.postfix = 0, ""
        self._start = self._last = time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n=1):
        self.n += n
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every or self.n == self.total):
            self._last = now
            self._draw(now)

    def set_postfix(self, text: str):
        self.postfix = text

    def _draw(self, now):
        elapsed = now - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            filled = int(20 * self.n / self.total)
            bar = f"|{'#' * filled}{'.' * (20 - filled)}| {self.n}/{self.total}"
        else:
            bar = f"{self.n}"
        post = f" {self.postfix}" if self.postfix else ""
        sys.stderr.write(f"\r{self.desc}: {bar} [{elapsed:.1f}s, {rate:.2f} it/s]{post}   ")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            if self.n != self.total:                  # the final count was not drawn yet
                self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- writing files safely

@contextmanager
def atomic_write(path, overwrite=False):
    """Yield a temporary path beside `path`; once the block succeeds it becomes `path` in one
    rename, so no reader sees a half-written file and a failure leaves nothing behind. Without
    `overwrite` an existing `path` is never replaced, even one created meanwhile by another process."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        yield tmp
        if not overwrite:
            claim_file(path)            # the name is ours, or someone else got there first
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def claim_file(path) -> Path:
    """Create `path` empty, failing if it exists: an atomic claim on the name."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it") from None
    return Path(path)


def fresh_folder(base, claim="transcript.md") -> Path:
    """`base`, or base-2, base-3, ...: the first that is missing or empty, claimed by creating its
    `claim` file exclusively, so runs started together never share a folder."""
    base = Path(base)
    for n in range(1, 100_000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.iterdir()):
            continue
        try:
            claim_file(folder / claim)
        except FileExistsError:
            continue                    # another run claimed it a moment ago
        return folder
    raise FileExistsError(f"{base}: no free numbered folder beside it")
