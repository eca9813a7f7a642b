"""The two ways a training run stops before its end, as exceptions the programs turn into one line,
and the signals that stop it (`StopSignals`).

Standard library only, so the programs can tell them apart before TensorFlow is imported.
"""

import signal
import threading


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class TrainingStopped(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint of the current step was written first."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, SIGTERM (what schedulers and preemptible VMs send before killing) and SIGINT
    (Ctrl-C) only set `received`; the loop then checkpoints the step it is at and stops. A second
    signal acts as usual (kills). Only in the main thread, and not in multi-worker runs, where
    saving needs every worker at once."""

    def __init__(self, enabled=True):
        self.received = None
        self._previous = {}
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if self._enabled:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
