"""SIGTERM / SIGUSR1 (Slurm's preemption and time-limit signals) as a flag the loop checks after each step."""

from __future__ import annotations

import signal

import torch


class Preemption:
    """Turns SIGTERM / SIGUSR1 into a flag that the loop checks after each step (on every rank together)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([float(self.requested)], device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
