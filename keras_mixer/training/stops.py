"""The ways a training run stops before its end, as exceptions the programs turn into one line, and
the signals that stop it (`StopSignals`).

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


class WorkerLost(RuntimeError):
    """A worker (a process of a run over several hosts) went away mid-run; the message says which,
    when and what was kept. The process leaves at once: its cluster would wait for the lost one at
    shutdown."""

    hard_exit = True


def worker_lost(lost, step, error, reason, newest, advice):
    """The `WorkerLost` of an `error` after `step` (the last step finished): `lost` names who went
    away, `reason` is the line of the error that says what happened, `newest` the newest checkpoint
    that restores (or None), `advice` how to resume."""
    return WorkerLost(
        f"lost {lost} after step {step} ({type(error).__name__}: {reason[:200]}). Newest checkpoint that restores: "
        f"{newest or 'none yet (the run starts again)'}. {advice}"
    )


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

    def stop_at(self, step):
        """Whether the run stops after `step` (the engine asks after each step it runs)."""
        return self.received is not None

    def stopped(self, step, total_steps, checkpoint):
        """The TrainingStopped of a stop after `step`, once `checkpoint` was written."""
        return TrainingStopped(
            f"stopped by {signal.Signals(self.received).name} at step {step} of {total_steps}; checkpoint "
            f"{checkpoint} written. Rerun the same command to resume from it.",
            self.received,
        )

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
