"""User-facing errors and the one table of process exit codes shared by every relalign command.

Errors for users are one line that names the thing (file, field, value) and what would be valid;
`run_cli` turns them into that line on stderr and the matching exit code, never a traceback.
Bugs are ordinary exceptions and keep their traceback.
"""
from __future__ import annotations

import enum
import sys
from typing import Callable, Sequence


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


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's `main`, mapping UserError to one stderr line and its exit code."""
    try:
        code = main(argv)
    except UserError as err:
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
    "empty_caption",  # no caption, or only whitespace
    "bad_utf8",  # caption or metadata not UTF-8
    "bad_metadata",  # json member that does not parse or has wrong field types
    "refused_member",  # a member that would need unpickling (.pyd, .pickle, .pth, ...)
    "duplicate_key",  # the same key twice in a shard
)
