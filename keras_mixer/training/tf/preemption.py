"""A multi-worker run's two faults on tf.distribute: a worker preempted, a worker lost.

Preemption. SIGTERM (what cloud schedulers and preemptible VMs send) or Ctrl-C on any worker makes
every worker checkpoint the same step and exit 143, through TensorFlow's own mechanism,
`tf.distribute.experimental.PreemptionCheckpointHandler`: the signalled worker publishes the step
to save at through the cluster's coordination service, every worker acknowledges, and each saves
there. The handler is asked after every host call (`MultiWorkerStop.check`); its save is the run's
own checkpoint (`save_fn`), so the walk-back rule, the digests of the step folder and metrics.json
are those of any checkpoint. The handler's own bookkeeping (a run counter it adds to the checkpoint
it is given) lives in a checkpoint of its own in a temporary folder, never in the run's.

A lost worker. When a worker dies, the collective the others are in fails with UnavailableError
(or a similar error) within seconds. `lost_worker` turns it into one line naming the tasks that no
longer answer, the step, and the newest checkpoint that restores; the process then leaves at once
(`hard_exit`), as TensorFlow's cluster would otherwise wait for the lost task at shutdown.
"""

import logging
import shutil
import signal
import tempfile

import tensorflow as tf

from keras_mixer.training.peers import describe, unreachable
from keras_mixer.training.stops import TrainingStopped, WorkerLost, worker_lost  # noqa: F401 (WorkerLost: v0.2 had it here)

# What a collective reports when a peer went away (connection reset, aborted by the health check,
# deadline passed); a file error or a bug keeps its own report.
PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.DeadlineExceededError,
    tf.errors.InternalError,
)


class MultiWorkerStop:
    """The preemption handler of a multi-worker run.

    Args:
        strategy: the MultiWorkerMirroredStrategy.
        save: `save(step)` writes the run's checkpoint of `step` (collective: every worker calls it).
        store: the run's CheckpointStore, for the message (`path(step)`).
        total_steps: the run's length, for the message.
    """

    def __init__(self, strategy, save, store, total_steps):
        self.step = None
        self.signalled = None  # the signal this worker received, if any
        self._save, self._store, self._total = save, store, total_steps
        self._folder = tempfile.mkdtemp(prefix="keras_mixer_preemption_")
        bookkeeping = tf.train.CheckpointManager(tf.train.Checkpoint(), self._folder, max_to_keep=1)
        config = tf.distribute.experimental.TerminationConfig(exit_fn=self._stop, save_fn=self._save_step)
        # The handler reads its own deprecated run counter when it saves: not the user's to fix.
        logging.getLogger("tensorflow").addFilter(lambda record: "total_run_calls" not in record.getMessage())
        self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            strategy.cluster_resolver, bookkeeping, termination_config=config
        )
        # Where the handler watches SIGTERM itself (it does but on GCE, where it reads the VM's
        # maintenance notice instead), Ctrl-C goes the same way, and the first signal is noted.
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):

            def noted(signum, frame):
                self.signalled = self.signalled or signum
                handler(signal.SIGTERM, frame)

            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, noted)

    def check(self, step):
        """After each host call, on every worker: saves `step` and stops when the cluster agreed on
        it (a worker was signalled one call earlier)."""
        self.step = step
        self._handler.save_checkpoint_if_preempted()

    def _save_step(self):
        self._save(self.step)

    def _stop(self):
        shutil.rmtree(self._folder, ignore_errors=True)
        signum = self.signalled or signal.SIGTERM
        why = signal.Signals(signum).name if self.signalled else "another worker of the cluster was preempted"
        checkpoint = self._store.path(self.step)  # the chief's copy, which every worker restores
        stopped = TrainingStopped(
            f"{why}: every worker saved step {self.step} of {self._total} ({checkpoint}). Rerun the same command on "
            f"every worker to resume from it.",
            signum,
        )
        stopped.hard_exit = True
        raise stopped

    def close(self):
        shutil.rmtree(self._folder, ignore_errors=True)


def lost_worker(error, cluster, step, store):
    """The `WorkerLost` for a collective's `error` at `step` (the last step finished), naming the
    tasks of `cluster` that no longer answer and the newest checkpoint of `store` that restores."""
    gone = unreachable(cluster.peers()) if cluster is not None else []
    # TensorFlow's message opens with the graph node's Python stack; its last line says what happened.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return worker_lost(
        describe(gone) if gone else "a worker of the cluster",
        step,
        error,
        lines[-1] if lines else "",
        store.newest_intact(),
        "Restart the lost worker and rerun the same command on every other one to resume from it.",
    )
