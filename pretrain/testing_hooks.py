"""Fault injection for the crash and preemption tests, in one place and inert unless a test asks.

The tests that prove a torn checkpoint is never resumed and that a SIGTERM inside a step still ends
in a saved, resumable checkpoint need a real process to die at an exact point. A test sets one of
the variables below in the environment of the rank it wants to fail; production code calls the
hooks at those points, and with the variables unset (every real run) each hook does nothing.
The environment is read once, on first use.

    RELALIGN_KILL_DURING_SAVE=<tag>      SIGKILL after this rank wrote its part of checkpoint <tag>,
                                         before the commit (tests/pretrain/test_resume.py)
    RELALIGN_SIGTERM_DURING_STEP=<n>     SIGTERM after the forward of step n's last micro-batch
                                         (tests/pretrain/test_train.py)
"""

from __future__ import annotations

import functools
import os
import signal
from typing import Callable

KILL_DURING_SAVE_ENV = "RELALIGN_KILL_DURING_SAVE"
SIGTERM_DURING_STEP_ENV = "RELALIGN_SIGTERM_DURING_STEP"


@functools.lru_cache(maxsize=1)
def _settings() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in (KILL_DURING_SAVE_ENV, SIGTERM_DURING_STEP_ENV)}


def checkpoint_part_written(tag: str) -> None:
    """Called between writing this rank's part of checkpoint `tag` and the commit."""
    if _settings()[KILL_DURING_SAVE_ENV] == tag:
        os.kill(os.getpid(), signal.SIGKILL)


def after_forward(step: int, last_micro_batch: bool) -> Callable[[], None] | None:
    """What to run after the forward of a micro-batch of optimiser step `step` (1-based); None: nothing."""
    if last_micro_batch and _settings()[SIGTERM_DURING_STEP_ENV] == str(step):
        return _sigterm_self
    return None


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
