"""Preemption signals: SIGTERM or SIGUSR1 asks the run to finish its step, checkpoint and exit 75.

The training loop reads `PreemptionFlag.received` after each micro-batch and agrees on it across
ranks with an all-reduce (`pretrain.train.micro_step`), so one signalled rank stops them all.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class PreemptionFlag:
    """Remembers SIGTERM/SIGUSR1; the loop agrees on it across ranks after each micro-batch.

    Slurm signals every process of a job step, DataLoader workers included, and torch's worker
    handler lets a worker die of SIGTERM: the run would crash instead of checkpointing. So the
    signals are also blocked in the main thread, which every thread and worker started afterwards
    inherits (a worker keeps the signal pending and ends normally when the loader is done), and a
    small thread receives them with sigwait. The Python handler stays for threads started earlier.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._mask: set[int] | None = None
        self._waiter: threading.Thread | None = None
        self._stopping = False

    def install(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        self._waiter = threading.Thread(target=self._wait, name="preemption-signals", daemon=True)
        self._waiter.start()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def _wait(self) -> None:
        while True:
            signum = signal.sigwait(self.SIGNALS)
            if self._stopping:
                return
            self.received = signum

    def restore(self) -> None:
        if self._waiter is not None:
            self._stopping = True
            signal.pthread_kill(self._waiter.ident, signal.SIGUSR1)  # wakes sigwait; ignored as stopping
            self._waiter.join(timeout=10)
            self._waiter = None
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._mask = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
