"""Stopping a training run on SIGTERM or SIGINT after its current step, so that --resume goes on exactly.

Cluster schedulers (SLURM, Kubernetes, spot instances) send SIGTERM and kill a little later; users press
Ctrl-C. ``StopSignal.install()`` turns both into a request that the training loop reads between steps:
it finishes the step, all ranks agree on the step to stop at (fastceleba/train_loop.py), a checkpoint of
that step is written, and train.py exits with EXIT_STOPPED. A second signal stops the process at once
(the newest complete checkpoint is kept: checkpoints are renamed into place only when whole).

A repeat within REPEAT_WINDOW seconds of the first is not a second signal: launchers forward the signal
they get to their workers (`accelerate launch`, torchrun), which a terminal's Ctrl-C or SLURM's scancel
has already sent to every process.
"""

from __future__ import annotations

import os
import signal
import sys
import time

REPEAT_WINDOW = 1.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped by a signal after writing a checkpoint; its message is the one line to print."""


class StopSignal:
    """SIGTERM/SIGINT set ``requested`` (and ``name``); the training loop decides when to stop."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._first = 0.0

    @property
    def requested(self) -> bool:
        return self.name is not None

    def install(self) -> "StopSignal":
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.name is None:
            self.name, self._first = signal.Signals(signum).name, now
            return
        if now - self._first < REPEAT_WINDOW:  # the same stop, forwarded by a launcher
            return
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"stopping at once ({signal.Signals(signum).name} again); the newest complete checkpoint is "
                  f"kept", file=sys.stderr, flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
