"""Lost-rank detection: a rank that dies makes the others exit with ExitCode.LOST_RANK, never hang.

When one rank is killed (OOM killer, a node failure, SIGKILL), the others block in their next
collective until the process-group timeout (minutes) or forever (a shared-memory wait, a store
wait). Here every rank runs a daemon thread that bumps its own heartbeat counter in the job's c10d
TCPStore (the rendezvous store at MASTER_ADDR:MASTER_PORT, hosted by torchrun's agent or by rank 0)
and reads everyone else's. A counter that has not moved for `timeout_s`, or a store that stopped
answering for `timeout_s` (the store lives with rank 0), names the lost rank: the thread prints one
line and ends the process with `os._exit(ExitCode.LOST_RANK)`; the main thread may be stuck inside
a C++ collective, which no Python exception could interrupt.

Heartbeats come from the thread, not from the training step, so a long step, an evaluation or a
checkpoint save is not mistaken for a death; a rank that is alive but deadlocked is left to the
process group's own timeout. Counters, not timestamps, so clocks of different hosts never matter.
A rank that finished calls `stop()`, which marks it done, so ranks that end at different moments are
not reported.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from typing import Callable, NoReturn

from data_tools.errors import ExitCode

from .dist_env import DistEnv

log = logging.getLogger(__name__)

PREFIX = "relalign/watchdog"


class RankWatchdog:
    """Heartbeats through the job's TCPStore; exits this process with LOST_RANK when a peer is gone."""

    def __init__(self, env: DistEnv, timeout_s: float, on_lost: Callable[[str], None] | None = None):
        """`timeout_s`: silence after which a peer counts as lost; `on_lost(message)`: last words
        (e.g. close the metrics logger) before the process exits; it must not block."""
        if not timeout_s > 0:
            raise ValueError(f"watchdog timeout_s must be > 0, got {timeout_s}")
        self.env, self.timeout_s, self.on_lost = env, float(timeout_s), on_lost
        self.interval_s = min(max(self.timeout_s / 5, 0.05), 5.0)
        """Seconds between heartbeats and checks: several beats fit in one timeout."""
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun reuses its store across restarts
        self._prefix = f"{PREFIX}/{restart}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None
        self.lost: str | None = None
        """The verdict once a peer is declared lost (the message printed before exiting)."""

    # --- public --------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to the store and start the heartbeat thread; a no-op for a one-rank job."""
        if self.env.world_size < 2 or self._thread is not None:
            return
        import torch.distributed as dist

        # A client connection of its own: the process group's store stays untouched by this thread.
        self._store = dist.TCPStore(
            self.env.master_addr,
            self.env.master_port,
            is_master=False,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=max(self.timeout_s, 1.0)),
        )
        self._store.add(self._key("beat", self.env.rank), 1)
        self._thread = threading.Thread(target=self._run, name="rank-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Mark this rank done (peers will not report it) and stop the thread. Idempotent."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.interval_s + max(self.timeout_s, 1.0))
        self._thread = None
        try:
            self._store.set(self._key("done", self.env.rank), "1")
        except (RuntimeError, OSError):  # the store (rank 0) is already gone: nobody is left to tell
            pass
        self._store = None

    def on_comm_error(self, error: BaseException) -> NoReturn:
        """Call from the main thread when a collective raised (gloo: "Connection closed by peer").

        Such an error means a peer is probably gone but does not say which; wait up to the timeout
        for the thread's verdict, which exits with LOST_RANK naming the rank. If no peer turns out
        lost, the original error is raised again.
        """
        deadline = time.monotonic() + self.timeout_s + 2 * self.interval_s
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(self.interval_s / 2)
        raise error

    # --- the thread ------------------------------------------------------------------------------
    def _key(self, kind: str, rank: int) -> str:
        return f"{self._prefix}/{kind}/{rank}"

    def _run(self) -> None:
        peers = [r for r in range(self.env.world_size) if r != self.env.rank]
        now = time.monotonic()
        last_count = {r: 0 for r in peers}
        last_change = {r: now for r in peers}
        store_ok_at = now
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                self._store.add(self._key("beat", self.env.rank), 1)
                done = set()
                for rank in peers:
                    count = self._store.add(self._key("beat", rank), 0)  # read without blocking
                    if count != last_count[rank]:
                        last_count[rank], last_change[rank] = count, now
                    elif self._store.check([self._key("done", rank)]):
                        done.add(rank)
                store_ok_at = now
            except (RuntimeError, OSError) as err:  # connection refused/reset: the store's host is gone
                if self._stop.is_set():
                    return
                if now - store_ok_at >= self.timeout_s:
                    self._declare(
                        0,
                        f"the rendezvous store at {self.env.master_addr}:{self.env.master_port} has not answered "
                        f"for {now - store_ok_at:.1f} s ({type(err).__name__})",
                    )
                continue
            peers = [r for r in peers if r not in done]
            silent = [r for r in peers if now - last_change[r] >= self.timeout_s]
            if silent:
                what = "no heartbeat yet" if last_count[silent[0]] == 0 else "no heartbeat"
                self._declare(silent[0], f"{what} for {now - last_change[silent[0]]:.1f} s")

    def _declare(self, rank: int, why: str) -> NoReturn:
        self.lost = (
            f"rank {rank} of {self.env.world_size} is lost: {why} (watchdog timeout {self.timeout_s:g} s); "
            f"rank {self.env.rank} exits with code {int(ExitCode.LOST_RANK)}"
        )
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        prog = spec.name.split(".")[0] if spec is not None else "relalign"  # `python -m pretrain` -> pretrain
        try:
            print(f"{prog}: error: {self.lost}", file=sys.stderr, flush=True)
            if self.on_lost is not None:
                self.on_lost(self.lost)
            sys.stdout.flush()
        finally:
            os._exit(int(ExitCode.LOST_RANK))
