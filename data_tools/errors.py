"""The bottom layer every relalign package uses: user errors, the one table of process exit codes,
`run_cli`, config-value checks and the one atomic-write helper.

Errors for users are one line that names the thing (file, field, value) and what would be valid;
`run_cli` turns them into that line on stderr and the matching exit code, never a traceback.
Bugs are ordinary exceptions and keep their traceback.

    check("train.steps", steps, steps >= 0, "an integer >= 0")      # ConfigError when not ok
    with atomic_write(path, "w") as fh: fh.write(text)               # readers see old or new, never half
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import os
import sys
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence


class ExitCode(enum.IntEnum):
    """Exit codes of `python -m data_tools|pretrain|finetune` (also listed in README.md)."""

    OK = 0
    """Done."""
    FAILURE = 1
    """An unexpected failure (a bug or an environment problem); the traceback is printed."""
    USAGE = 2
    """Bad arguments or configuration; nothing was started."""
    DATA = 3
    """Data does not match its dataset.json (verify found a mismatch) or no usable samples."""
    NONFINITE = 4
    """Training stopped after too many non-finite losses in a row; the last good state was saved."""
    LOST_RANK = 5
    """Another rank died or stopped answering; this rank gave up after the configured timeout."""
    PREEMPTED = 75
    """Preempted (SIGTERM/SIGUSR1): the current step finished, a checkpoint was saved: resume me.
    75 is EX_TEMPFAIL from sysexits.h; a Slurm script requeues on it."""


class UserError(Exception):
    """A mistake in arguments, configuration or input that the user can fix. Message: one line."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, exit_code: ExitCode | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(UserError):
    """An invalid configuration value: names the dotted field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config: {field}={value!r} is not allowed: expected {allowed}")


def check(field: str, value: object, ok: bool, allowed: str) -> None:
    """The one range/choice check of config dataclasses: ConfigError(field, value, allowed) unless ok."""
    if not ok:
        raise ConfigError(field, value, allowed)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Write `path` all or nothing: a temporary name in the same folder, fsync, `os.replace`, fsync
    of the folder (so the rename itself survives a power loss). On an exception the temporary file
    is removed and `path` keeps its old content. Mode "w" (text) or "wb" (bytes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    binary = "b" in mode
    try:
        with open(tmp, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def atomic_replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temporary file or folder over `path` and fsync the folder (for writers that
    produce the temporary themselves, e.g. pyarrow, tar writers, DeepSpeed checkpoint folders)."""
    tmp_path = Path(tmp)
    if tmp_path.is_file():
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp_path, path)
    fsync_dir(Path(path).parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder (durable renames); a no-op where the platform cannot open folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: one `<prog>: error: ...` line and exit 2 through
    run_cli (plain argparse prints the whole usage block first). --help still prints the usage."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


def is_local_leader() -> bool:
    """This process is the first of its node under a launcher (or there is no launcher): the one
    that prints a mistake every rank finds alike before any process group starts."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name)
        if value is not None:
            return value.strip() == "0"
    return True


def run_cli(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, quiet: bool = False
) -> int:
    """Run a command's `main`, mapping UserError to one stderr line and its exit code (`quiet`: the
    code only, for the other ranks of a launcher, which would print the same line)."""
    try:
        code = main(argv)
    except UserError as err:
        if not quiet:
            prog = getattr(main, "__module__", "relalign").split(".")[0]
            print(f"{prog}: error: {err}", file=sys.stderr)
        return int(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


class BadSample(Exception):
    """A sample that cannot be used (unreadable image, empty caption, refused member...).

    Builders skip and list it in rejected.jsonl, the loader skips and counts it; `reason` is one of
    BAD_SAMPLE_REASONS and becomes the `reason` label of the bad-sample counter.
    """

    def __init__(self, reason: str, detail: str = ""):
        assert reason in BAD_SAMPLE_REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


BAD_SAMPLE_REASONS = (
    "missing_image",  # no image file / member
    "decode_error",  # not an image, truncated, unreadable
    "too_many_pixels",  # more pixels than the configured limit (decompression bomb)
    "too_large",  # an input file over the builder's byte limit (read stops there)
    "empty_caption",  # no caption, or only whitespace
    "bad_utf8",  # caption or metadata not UTF-8
    "bad_metadata",  # json member that does not parse or has wrong field types
    "refused_member",  # a member that would need unpickling (.pyd, .pickle, .pth, ...)
    "duplicate_key",  # the same key twice in a shard
)
