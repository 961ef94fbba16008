"""Stop a run cleanly on SIGTERM (what a SageMaker spot interruption sends) or SIGINT (Ctrl-C).

During the training steps the first signal only asks the loop to stop: the current step finishes,
every process agrees at the step boundary (a signal may reach only some of them), the last
completed step is checkpointed, and `TrainingInterrupted` carries the one-line message and the exit
code (128 + the signal number, the shell's convention: 143 for SIGTERM, 130 for SIGINT). A later
`--resume` continues from that checkpoint as if nothing had happened.

A second signal stops at once, without a checkpoint of the current step. Launchers forward the
terminal's Ctrl-C to processes that already got it (torchrun does), so a repeat within
`REPEAT_GRACE_S` counts as the same signal.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

from rft import distributed

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_GRACE_S = 2.0


class TrainingInterrupted(Exception):
    """The run stopped on a signal; the message says where and what was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """A SIGTERM handler for outside the training steps: stop at once, as SIGINT's KeyboardInterrupt does."""
    raise TrainingInterrupted(signum, f"{signal_name(signum)} outside the training steps: stopped at once; "
                                      "--resume continues from the last checkpoint")


class StopOnSignal:
    """Iterate the training steps through `steps`: SIGTERM / SIGINT then end the loop after the current
    step."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.received: int | None = None
        self.stopped_by: int | None = None
        self._received_at = 0.0

    def steps(self, steps: Iterable[int]) -> Iterator[int]:
        """`steps`, until a signal: each step is checked for one after the loop body ran (a collective).

        The handlers are in place only while the loop runs; a generator's `finally` runs however the loop
        ends, by exception too.
        """
        # Python runs signal handlers in the main thread only, and only there can they be installed.
        install = threading.current_thread() is threading.main_thread()
        previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS} if install else {}
        try:
            for step in steps:
                yield step
                if (signum := self.agreed()) is not None:
                    self.stopped_by = signum
                    return
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            if time.monotonic() - self._received_at < REPEAT_GRACE_S:
                return
            raise TrainingInterrupted(
                signum, f"{signal_name(signum)} again: stopped at once, without a checkpoint of this step; "
                "--resume continues from the last checkpoint",
            )
        self.received, self._received_at = signum, time.monotonic()
        logger.warning(
            "%s: finishing this step, then saving a checkpoint and stopping (send it again to stop at once)",
            signal_name(signum),
        )

    def agreed(self) -> int | None:
        """The signal some process received, the same answer everywhere: every process stops after the
        same step."""
        seen = distributed.gather_from_processes(self.accelerator, self.received)
        return next((signum for signum in seen if signum is not None), None)
