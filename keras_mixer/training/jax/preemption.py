"""A JAX-backend run over several hosts under its two faults: a process preempted, a process lost.

Preemption. SIGTERM (what a preemptible VM, a spot VM or `docker stop` sends) or Ctrl-C on any
process makes every process stop after one agreed step, save it (orbax, collectively) and exit
143, through JAX's own mechanism: jax.distributed installs a SIGTERM notifier on each process,
the notified process publishes its notice through the coordination service, and
`multihost_utils.reached_preemption_sync_point(step)`, asked after every step on every process,
is true on all of them at the same step (`PreemptionSync`). JAX watches SIGTERM only, so Ctrl-C
is turned into a SIGTERM of the process itself.

A lost process. When a process dies, the collective the others are in fails at once (gloo, or
the accelerators' own, reports its peer closed the connection). `lost_process` turns that into
one line naming the processes whose `cluster.Presence` port no longer answers, the last finished
step and the newest checkpoint that restores; the process then leaves at once (`hard_exit`), as
jax.distributed's shutdown would wait for the lost process until its heartbeat timeout.
"""

import os
import signal
import threading
import time

from jax.experimental import multihost_utils

from keras_mixer.training.peers import describe, unreachable
from keras_mixer.training.stops import TrainingStopped, worker_lost


class PreemptionSync:
    """`stops.StopSignals`' counterpart where saving is collective: `stop_at(step)` asks JAX's
    preemption sync point after every step; once it is reached, `received` is the signal (SIGINT
    on the process that got Ctrl-C, SIGTERM on every other)."""

    def __init__(self):
        self.received = None
        self._interrupted = False
        self._previous = None

    def _interrupt(self, signum, frame):
        self._interrupted = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C acts as usual
        os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier watches SIGTERM

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def stop_at(self, step):
        if self.received is None and multihost_utils.reached_preemption_sync_point(step):
            self.received = signal.SIGINT if self._interrupted else signal.SIGTERM
        return self.received is not None

    def stopped(self, step, total_steps, checkpoint):
        why = "SIGINT" if self._interrupted else "a process of the run received SIGTERM (or Ctrl-C)"
        return TrainingStopped(
            f"{why}: every process saved step {step} of {total_steps} ({checkpoint}). Rerun the same command on "
            f"every process to resume from it.",
            self.received,
        )

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def lost_process(error, presences, step, store, settle=2.0):
    """The `WorkerLost` for a collective's `error` after `step` (the last step finished), naming
    the processes of `presences` ({id: "host:port"}, this process's left out) that no longer
    answer and the newest checkpoint of `store` that restores; None when every process still
    answers after `settle` seconds (then `error` is not a lost process)."""
    deadline = time.monotonic() + settle
    while True:
        gone = unreachable([(f"process {i}", address) for i, address in sorted(presences.items())])
        if gone or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if not gone:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    hosts = [(name, address.rpartition(":")[0]) for name, address in gone]
    return worker_lost(
        describe(hosts),
        step,
        error,
        lines[0] if lines else "",
        store.newest_intact(),
        "Start every process again (the same command) to resume from it.",
    )
