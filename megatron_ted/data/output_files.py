"""Writing a tool's output files without touching what the user already has.

Every tool that writes a file (`tools/preprocess_data.py`, `tools/make_corpus.py`,
`tools/train_tokenizer.py`) writes to a temporary created by this run next to the output and renames
it into place only when it is complete; a file that is already there is replaced only when the user
asked for it (`--overwrite`). Problems are ValueError naming the flag, for a one-line report.
"""
from __future__ import annotations

import os


def refuse_existing(paths: list[str], flag: str, overwrite: bool) -> None:
    """ValueError when an output exists and `overwrite` is off (or is a directory: never replaced)."""
    for path in paths:
        if os.path.isdir(path):
            raise ValueError(f"{flag}: {path} is a directory; name a file")
        if os.path.lexists(path) and not overwrite:
            raise ValueError(f"{flag}: {path} exists; pass --overwrite to replace it or choose another name")


def make_output_dir(path: str, flag: str) -> str | None:
    """Create the directory that will hold `path`; returns the topmost directory this call created
    (None: it existed). A path under a regular file or in an unwritable directory is a ValueError."""
    out_dir = os.path.dirname(os.path.abspath(path))
    created = None
    probe = out_dir
    while not os.path.exists(probe):
        created, probe = probe, os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {path}: {probe} is a file, not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create {out_dir} ({err.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: directory {out_dir} is not writable")
    return created


def remove_created_dirs(path: str, created: str | None) -> None:
    """Remove the (now empty) directories `make_output_dir` created, deepest first."""
    if created is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            os.rmdir(directory)
        except OSError:
            return
        if directory == created:
            return
        directory = os.path.dirname(directory)


def create_temporary(path: str, suffixes: tuple[str, ...] = ("",)) -> str:
    """A new name `<path>.tmp-<pid>-<n>` such that `<name><suffix>` for every suffix is a new, empty
    file created by this run (never one that was there); returns the name."""
    for n in range(100):
        candidate = f"{path}.tmp-{os.getpid()}-{n}"
        made = []
        try:
            for suffix in suffixes:
                os.close(os.open(candidate + suffix, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                made.append(candidate + suffix)
            return candidate
        except FileExistsError:
            for p in made:
                os.remove(p)
    raise OSError(f"cannot create a temporary file next to {path}")


def remove_temporaries(paths) -> None:
    """Remove this run's temporaries that still exist."""
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


def fsync_file(path: str) -> None:
    """Flush a written file to disk (before the rename that publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
