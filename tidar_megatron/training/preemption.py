"""Stop requests as a flag the loop checks after each step: SIGTERM / SIGUSR1 (Slurm's preemption and
time-limit signals) and SIGINT (Ctrl-C).  Each finishes the step, saves and exits; a second Ctrl-C aborts
at once (the default action of SIGINT: the process ends wherever it is, and a save it was writing stays an
unpublished temporary that the next save removes)."""

from __future__ import annotations

import os
import signal

import torch

_PREEMPTED, _INTERRUPTED = 1.0, 2.0


class Preemption:
    """Installs the handlers on construction and restores the previous ones on `close()`, so that a caller
    that goes on after training (the quickstart) gets its Ctrl-C back."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, announce: bool = True):
        """`announce`: say on stderr, as Ctrl-C arrives, what will happen (rank 0 only)."""
        self.announce = announce
        self.request = 0.0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process at once
            if self.announce:  # os.write: print() may be in use by the code this handler interrupted
                os.write(2, b"\nCtrl-C: saving after this step, then exiting (Ctrl-C again aborts without saving)\n")
        self.request = max(self.request, _INTERRUPTED if signum == signal.SIGINT else _PREEMPTED)

    def agreed(self) -> str | None:
        """'interrupted' (Ctrl-C on any rank), 'preempted' (SIGTERM / SIGUSR1) or None, the same on every rank."""
        flag = torch.tensor([self.request], device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return {_PREEMPTED: "preempted", _INTERRUPTED: "interrupted"}.get(flag.item())

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
