"""The training loop, written once for both Keras backends: a run's whole sequence, handed the
engine of the process's backend (`training.tf.engine` on tf.distribute, `training.jax.engine` on
Keras' JAX backend; `keras_mixer.training.train` picks it).

    run_training(config, engine)
      -> engine.start: devices and hosts, what the run runs on; the workdir checked (made)
      -> lock the workdir (one owner), catch SIGTERM/SIGINT (`engine.stop_signals`: one process
         stops on its own signal, several agree on one step)
      -> prepare: leftovers out, recipe checked against run.json, data sources, run length
      -> engine.build: model, optimizer, state, checkpoint store (`checkpoint_store`); the newest
         intact checkpoint restored (the walk-back rule); a finished run is left as it is
      -> run.json; engine.compile: the step, the evaluator
      -> host calls of steps up to the next boundary, each followed by the report, a checkpoint,
         an evaluation and a few-shot probe when due (`train_steps`)
      -> finish: model.keras, the TF Serving export, metrics.json

Preemption: a checkpoint (the state, the step, the run's data seed, the dropout/drop-path RNG
states) every `checkpoint_every` steps, at the end and when signalled. A rerun with the same
workdir restores the newest intact checkpoint and rebuilds the input stream at the same position:
epoch e's stream is a pure function of (run seed, e) (`preparation.epoch_seed`), and the
examples of the finished steps are skipped.

Nothing here imports TensorFlow or JAX: the engine does.
"""

import logging
import math
import os
from typing import Protocol

import numpy as np

from keras_mixer.training.checkpoint_store import NoCheckpointRestores, has_broken
from keras_mixer.training.preparation import already_finished, prepare, previous_metrics, trained_on, write_record
from keras_mixer.training.reporting import Report, Throughput
from keras_mixer.training.stops import TrainingDiverged
from keras_mixer.training.workdir import WorkdirLock, check_workdir
from keras_mixer.weights_io.official_keys import save_keras, save_npz

log = logging.getLogger("keras_mixer")


class Engine(Protocol):
    """What a backend gives the loop: where the run runs, its state, its steps and its files."""

    kind: str  # recorded in metrics.json: a tf.distribute strategy kind, or "jax data-parallel"
    chief: bool  # whether this process writes the workdir
    replicas: int  # the devices of a step, all hosts together
    process_index: int  # this process among the run's workers or hosts (0: the chief)
    # True where steps queue on the devices without the host waiting (JAX's asynchronous dispatch):
    # a host call then runs to the next boundary whatever steps_per_loop says, as reading the loss
    # is the only wait, and the devices never idle while the host does its bookkeeping.
    queues_steps: bool
    store: object  # the run's `checkpoint_store.CheckpointStore`, made by `build`

    def start(self, config):
        """Devices and hosts before anything is written (the strategy; jax.distributed and
        DataParallel); the chief prints what the run runs on."""

    def stop_signals(self):
        """The context that catches SIGTERM and Ctrl-C while the run trains: `stops.StopSignals`
        where a process stops on its own; where saving is collective, every process's agreement
        on one step, or nothing (the engine stops the run itself, `between_calls`). It has
        `received` (the signal, once the run is to stop), `stop_at(step)` and `stopped(step,
        total_steps, checkpoint)` (the TrainingStopped to raise)."""

    def build(self, run, first_seed):
        """The model (returned), optimizer, training state and checkpoint store; `first_seed`
        seeds the input stream of a run that does not resume."""

    def restore(self):
        """The newest checkpoint that restores completely, into the state: its step, or None."""

    def compile(self, run):
        """The step, the evaluator and the probe's features; (whether XLA compiles the step, the
        line saying so)."""

    def running(self, report):
        """A context around the steps: a multi-worker run's stop agreement and lost workers."""

    def open_epoch(self, epoch, skip_steps):
        """Starts epoch `epoch`'s input stream (`epoch_seed`), its first `skip_steps` steps skipped."""

    def train(self, count, stop_at):
        """Runs `count` steps on the open stream, fewer where it can stop early once `stop_at(step)`
        is true after a step (`stop_signals`); (steps run, then their mean loss, gradient norm and
        top-1 as floats)."""

    def learning_rate(self, step):
        """The schedule's rate after `step` steps."""

    def weights_finite(self):
        """False when a trainable weight is NaN or Inf."""

    def save(self, step):
        """Checkpoints the state after `step` steps."""

    def evaluate(self):
        """(top-1, top-5) of the current weights on the evaluation split."""

    def features(self):
        """images [B, H, W, 3] -> pre-logits [B, C] of the current weights, for the few-shot probe."""

    def between_calls(self, step):
        """After each host call's checkpoint, evaluation and probe, at `step`: where the cluster
        agreed to stop (a multi-worker run's preemption), saves and raises TrainingStopped."""

    def close(self):
        """After the last step: the final state into the Keras model (and optimizer), to save it."""

    def export(self, model, export_base, version, trained_on, precision):
        """The TF Serving version folder of the finished model (its path), or None with a note
        printed where it cannot be written."""


def run_training(config, engine, restart=False, accept_changes=()):
    """Trains as `config` says on `engine` and returns the final metrics (also in
    WORKDIR/metrics.json). `restart` and `accept_changes`: as `keras_mixer.training.train`."""
    engine.start(config)  # first: a cluster that never forms leaves no workdir behind
    check_workdir(config.workdir)
    lock = WorkdirLock(config.workdir).acquire() if engine.chief else None
    try:
        with engine.stop_signals() as signals:
            run = prepare(config, engine.kind, engine.chief, engine.replicas, restart, tuple(accept_changes))
            return _train(run, engine, signals)
    finally:
        if lock is not None:
            lock.release()


def _train(run, engine, signals):
    config = run.config
    first_seed = config.seed if config.seed is not None else int(np.random.default_rng().integers(2**31 - 1))
    model = engine.build(run, first_seed)
    resumed_from = engine.restore()
    if resumed_from is None and has_broken(engine.store.directory):
        raise NoCheckpointRestores(
            f"{engine.store.directory} holds only checkpoints that were moved to broken/ earlier; pass --restart "
            f"to start again from step 0 (the current files are moved to WORKDIR/previous/, not deleted)"
        )
    previous = previous_metrics(run, resumed_from)
    if already_finished(run, resumed_from, previous):
        return previous
    if run.chief:
        if resumed_from is not None:
            print(f"Resumed from step {resumed_from} ({engine.store.latest()})", flush=True)
        write_record(run, model, resumed_from)
    use_xla, xla_line = engine.compile(run)
    if run.chief:
        print(xla_line, flush=True)
    step = resumed_from or 0
    report = make_report(run, step, resumed_from, previous, use_xla)
    with engine.running(report):
        train_steps(run, engine, report, signals, step)
    engine.store.discard_copies()
    if config.write_worker_weights:
        folder = run.workdir if run.chief else os.path.join(run.workdir, f"worker_{engine.process_index}")
        os.makedirs(folder, exist_ok=True)
        save_npz(model, os.path.join(folder, "final_weights.npz"))
    if run.chief:
        finish(run, model, report, engine.export)
    return report.metrics


def make_report(run, step, resumed_from, previous, use_xla):
    """The run's `Report`, its metrics.json starting from `previous` (a resumed run's) at `step`."""
    config = run.config
    data_problems = {s.split: s.problems() for s in (run.train_source, run.eval_source) if s.problems()}
    metrics = dict(
        finished=False,
        step=step,
        total_steps=run.total_steps,
        train_loss=previous.get("train_loss"),
        train_top1=previous.get("train_top1"),
        eval_top1=None,
        eval_top5=None,
        eval_split=run.eval_split,
        images_per_second=None,
        # The loss history of the steps before the restored checkpoint survives in metrics.json.
        loss_history=[h for h in previous.get("loss_history", []) if h[0] <= step],
        resumed_from_step=resumed_from or 0,
        model=config.model,
        dataset=config.dataset,
        strategy=run.kind,
        replicas=run.replicas,
        xla=use_xla,
        data_problems=data_problems,
        fewshot=None,
    )
    return Report(run.workdir, run.chief, run.total_steps, metrics, config.log_every)


def diverged(what, store):
    last = store.latest()
    raise TrainingDiverged(
        f"{what}: training stopped. The last good checkpoint ({last or 'none yet'}) is kept; lower the "
        f"learning rate or check the data, then rerun with the same --workdir to resume from it."
    )


def next_boundary(step, config, epoch_end):
    """The next step at which the loop must stop to log, checkpoint, evaluate, probe or change epoch."""
    candidates = [epoch_end, (step // config.checkpoint_every + 1) * config.checkpoint_every]
    candidates.append((step // config.log_every + 1) * config.log_every)
    for every in (config.eval_every, config.fewshot_every):
        if every:
            candidates.append((step // every + 1) * every)
    return min(candidates)


def train_steps(run, engine, report, signals, step):
    """The host calls from `step` to the run's end, then the final evaluation (and probe); returns
    the step reached. A call runs up to the next boundary (`next_boundary`, at most
    `steps_per_loop` steps unless the engine queues steps); after it: the report, a checkpoint
    when due or signalled (then TrainingStopped), an evaluation and a probe when due. A NaN or
    Inf loss, or weights that are not finite when a checkpoint is due, stop the run with the last
    good checkpoint kept."""
    config = run.config
    speed = Throughput(config.batch_size)
    while step < run.total_steps:
        epoch, offset = divmod(step, run.steps_per_epoch)
        engine.open_epoch(epoch, offset)
        epoch_end = min((epoch + 1) * run.steps_per_epoch, run.total_steps)
        speed.restart()  # a new input stream fills its buffers first
        warm = False
        while step < epoch_end:
            # Where steps queue, the stream's first call is one step (compilation, the input's
            # buffers: `Throughput` leaves it out), the others run to the next boundary.
            limit = (run.total_steps if warm else 1) if engine.queues_steps else config.steps_per_loop
            count = min(limit, next_boundary(step, config, epoch_end) - step)
            warm = True
            speed.start()
            count, loss, norm, top1 = engine.train(count, signals.stop_at)
            rate = speed.stop(count)
            if not math.isfinite(loss):
                diverged(f"loss is {loss} at step {step + count}", engine.store)
            step += count
            log_point = step % config.log_every == 0 or step == run.total_steps
            learning_rate = engine.learning_rate(step) if log_point else None
            report.trained(step, loss, top1, norm, learning_rate, rate, log_point)
            if step % config.checkpoint_every == 0 or step == run.total_steps or signals.received:
                # A finite loss can still come with an update that overflowed: never save such weights.
                if not engine.weights_finite():
                    diverged(f"weights became NaN or Inf at step {step}", engine.store)
                engine.save(step)
                report.save(images_per_second=speed.rate())  # progress: a resumed run continues it
            if signals.received:
                raise signals.stopped(step, run.total_steps, engine.store.path(step))  # the chief's copy
            if config.eval_every and step % config.eval_every == 0 and step < run.total_steps:
                report.evaluated(step, *engine.evaluate())
            if config.fewshot_every and step % config.fewshot_every == 0 and step < run.total_steps:
                report.fewshot(step, run.fewshot(engine.features()))
            engine.between_calls(step)
    report.evaluated(step, *engine.evaluate())
    engine.close()
    if run.fewshot:
        report.fewshot(step, run.fewshot(engine.features()))
    report.metrics.update(finished=True, images_per_second=speed.rate())
    return step


def finish(run, model, report, export):
    """Chief only: the final model (.keras), the export and metrics.json, each written so that a
    kill at any point leaves either nothing or a complete file; a rerun completes what is missing
    and never writes a second export of the same step.

    `export(model, export_base, version, trained_on, precision) -> path` writes the TF Serving
    version folder (`export.export_saved_model` on TensorFlow's backend), or returns None with a
    note printed where it cannot."""
    config, metrics = run.config, report.metrics
    about = trained_on(config, run.train_source.class_names).replace(step=metrics["step"])
    metrics["model_path"] = save_keras(model, os.path.join(run.workdir, "model.keras"), about.to_dict())
    if config.export:
        export_base = os.path.join(run.workdir, "export")
        target = os.path.join(export_base, str(metrics["step"]))  # version = step: one export per step
        if os.path.isdir(target):
            log.info("%s exists already (an earlier, interrupted finish): not exported again", target)
            metrics["export_path"] = target
        else:
            metrics["export_path"] = export(model, export_base, metrics["step"], about, config.export_precision)
    report.save()
    exported = "export/, " if metrics.get("export_path") else ""
    print(
        f"Finished step {metrics['step']}: eval top-1 {metrics['eval_top1']:.4f}, top-5 {metrics['eval_top5']:.4f}, "
        f"{metrics['images_per_second'] or 0:.0f} img/s. Workdir: {os.path.abspath(run.workdir)} "
        f"(checkpoints/, tensorboard/, model.keras, {exported}metrics.json)",
        flush=True,
    )
