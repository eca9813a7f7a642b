"""The training loop on every tf.distribute engine (Keras' TensorFlow backend).

    train_tf(config)                     (`trainer.train` hands a TensorFlow-backend process here)
      -> lock the workdir (one owner), catch SIGTERM/SIGINT
      -> run.prepare: leftovers out, recipe checked against run.json, data sources, run length
      -> _build: model (fresh or from weights), optimizer, training state, CheckpointStore;
                 restore the newest checkpoint that restores completely
      -> _train: host calls of `steps_per_loop` steps (step.make_train_steps), each followed by the
                 report, a checkpoint, an evaluation and a few-shot probe when due
      -> run.finish: final evaluation (and probe), model.keras, the export, metrics.json

Preemption: a checkpoint (model, optimizer, step, the run's data seed, the dropout/drop-path RNG
states) every `checkpoint_every` steps and at the end. A restart with the same workdir restores the
newest intact checkpoint and rebuilds the data stream at the same position: epoch e's stream is a
pure function of (run seed, e), and the examples of the finished steps are skipped.
"""

import logging
import os

import numpy as np
import tensorflow as tf

from keras_mixer import data
from keras_mixer.training.fewshot import features_function
from keras_mixer.training.optimizer import make_optimizer
from keras_mixer.training.run import (
    StopSignals,
    already_finished,
    build_model,
    epoch_seed,
    finish,
    make_report,
    prepare,
    previous_metrics,
    recipe_pipeline_args,
    train_steps,
    write_record,
)
from keras_mixer.training.tf.checkpoints import CheckpointStore, NoCheckpointRestores, has_checkpoint_files
from keras_mixer.training.tf.cluster import read_tf_config
from keras_mixer.training.tf.evaluation import make_evaluator
from keras_mixer.training.tf.step import all_finite, decide_xla, make_train_steps
from keras_mixer.training.tf.strategy import choose_strategy, is_chief, make_strategy, replica_devices, task_id
from keras_mixer.training.workdir import WorkdirLock, check_workdir
from keras_mixer.weights_io.official_keys import save_npz

log = logging.getLogger("keras_mixer")


def train_tf(config, strategy=None, restart=False, accept_changes=()):
    """`trainer.train` on Keras' TensorFlow backend, under `strategy` (else one made from
    `config.strategy`): trains as `config` says and returns the final metrics."""
    if strategy is None:
        tf_config = os.environ.get("TF_CONFIG")
        kind = choose_strategy(config.strategy, config.tpu, tf_config, len(tf.config.list_physical_devices("GPU")))
        strategy = make_strategy(kind, config.tpu, tf_config, config.cluster_timeout)
    else:
        kind = type(strategy).__name__
    check_workdir(config.workdir)
    if is_chief(strategy):
        devices = ", ".join(replica_devices(strategy))
        replicas = strategy.num_replicas_in_sync
        print(f"Keras on tensorflow, {kind} strategy, {replicas} replica(s): {devices}", flush=True)
    lock = WorkdirLock(config.workdir).acquire() if is_chief(strategy) else None
    try:
        # Multi-worker: a signal stops every worker at one step (preemption.MultiWorkerStop).
        with StopSignals(enabled=not _in_multi_worker_mode(strategy)) as signals:
            chief, replicas = is_chief(strategy), strategy.num_replicas_in_sync
            run = prepare(config, kind, chief, replicas, restart, tuple(accept_changes))
            if config.seed is not None:
                tf.config.experimental.enable_op_determinism()
            return _train(run, strategy, signals)
    finally:
        if lock is not None:
            lock.release()


def _in_multi_worker_mode(strategy):
    return getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)()


def _build(run, strategy):
    """(model, optimizer, step variable, run seed variable, CheckpointStore), restored from the
    newest intact checkpoint if there is one."""
    config = run.config
    with strategy.scope():
        model = build_model(config, run.train_source.num_classes)
        optimizer = make_optimizer(run.total_steps, model.trainable_variables, **config.optimizer_args())
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        first_seed = config.seed if config.seed is not None else int(np.random.default_rng().integers(2**31 - 1))
        run_seed = tf.Variable(first_seed, dtype=tf.int64, trainable=False, name="run_seed")
    # Keras' seed-generator states (stochastic depth, dropout) are not among the variables a
    # tf.train.Checkpoint finds through the model: save them by name, or a resumed run would draw
    # other masks than an uninterrupted one.
    rng_states = {v.path.replace("/", "."): v for v in model.non_trainable_variables if "seed_generator" in v.path}
    state = tf.train.Checkpoint(
        model=model, optimizer=optimizer, step=step_var, run_seed=run_seed, rng_states=rng_states
    )
    # Every worker must write (saving is collective); only the chief's copy is kept.
    write_dir = None if run.chief else os.path.join(run.workdir, f".tmp_worker_{task_id(strategy)}")
    folder = os.path.join(run.workdir, "checkpoints")
    store = CheckpointStore(state, folder, config.keep_checkpoints, write_dir)
    return model, optimizer, step_var, run_seed, store


def _resume(run, store):
    """Restores the newest intact checkpoint into the built model: (the step restored, None for a
    fresh start; the run's metrics.json so far, {} for none). A run whose checkpoints were all moved
    to broken/ earlier is refused (NoCheckpointRestores) rather than silently restarted."""
    resumed_from = store.restore_newest()
    if resumed_from is None and has_checkpoint_files(store.directory):
        raise NoCheckpointRestores(
            f"{store.directory} holds only checkpoints that were moved to broken/ earlier; pass --restart to "
            f"start again from step 0 (the current files are moved to WORKDIR/previous/, not deleted)"
        )
    return resumed_from, previous_metrics(run, resumed_from)


def _train(run, strategy, signals):
    config = run.config
    model, optimizer, step_var, run_seed, store = _build(run, strategy)
    resumed_from, previous = _resume(run, store)
    if already_finished(run, resumed_from, previous):
        return previous
    if run.chief:
        if resumed_from is not None:
            print(f"Resumed from step {resumed_from} ({store.latest()})", flush=True)
        write_record(run, model, resumed_from)

    use_xla, xla_reason = decide_xla(config.xla, config.mixed_precision, run.kind)
    if run.chief:
        print(f"XLA {'on' if use_xla else 'off'} for the training step: {xla_reason}", flush=True)
    steps = make_train_steps(strategy, model, optimizer, step_var, use_xla=use_xla, **config.step_args())
    evaluate = make_evaluator(
        strategy,
        lambda images: model(images, training=False),
        run.eval_source,
        config.batch_size,
        config.image_size,
        config.eval_preprocessing,
    )
    # The probe reads the model in inference mode only: no dropout or drop-path draws, no training data.
    fewshot_features = features_function(model) if run.fewshot else None
    step = int(step_var.numpy())
    report = make_report(run, step, resumed_from, previous, use_xla)
    engine = _Engine(run, strategy, model, optimizer, run_seed, store, steps, evaluate, fewshot_features)
    if not _in_multi_worker_mode(strategy):
        train_steps(run, engine, report, signals, step)
    else:
        from keras_mixer.training.tf.preemption import PEER_ERRORS, MultiWorkerStop, lost_worker

        def save(at):  # a checkpoint as any other, and metrics.json with it
            store.save(at)
            report.save()

        engine.stop = MultiWorkerStop(strategy, save, store, run.total_steps)
        try:
            train_steps(run, engine, report, signals, step)
        except PEER_ERRORS as e:
            cluster = read_tf_config(os.environ.get("TF_CONFIG"))
            raise lost_worker(e, cluster, report.metrics["step"], store) from None
        finally:
            engine.stop.close()
    store.discard_worker_copies()
    if config.write_worker_weights:
        folder = run.workdir if run.chief else os.path.join(run.workdir, f"worker_{task_id(strategy)}")
        os.makedirs(folder, exist_ok=True)
        save_npz(model, os.path.join(folder, "final_weights.npz"))
    if run.chief:
        finish(run, model, report, _export)
    return report.metrics


class _Engine:
    """`run.Engine` on tf.distribute: a tf.function of `count` steps over the strategy's iterator
    (`step.make_train_steps`), a tf.train.Checkpoint in a `CheckpointStore`."""

    queues_steps = False  # a call of `count` steps is one tf.function run: steps_per_loop sizes it

    def __init__(self, run, strategy, model, optimizer, run_seed, store, steps, evaluate, fewshot_features):
        self.run, self.strategy, self.model, self.optimizer = run, strategy, model, optimizer
        self.run_seed, self.store, self.steps, self.evaluate = run_seed, store, steps, evaluate
        self.fewshot_features = fewshot_features
        self.iterator = None
        self.stop = None  # a multi-worker run's preemption.MultiWorkerStop

    def between_calls(self, step):
        if self.stop is not None:
            self.stop.check(step)

    def open_epoch(self, epoch, skip_steps):
        stream = _epoch_stream(self.run, self.strategy, int(self.run_seed.numpy()), epoch, skip_steps)
        self.iterator = iter(stream)

    def train(self, count, stopped):
        return count, *(float(v) for v in self.steps(self.iterator, tf.constant(count)))

    def learning_rate(self, step):
        return float(self.optimizer.learning_rate)  # the optimizer's own step count is `step`

    def weights_finite(self):
        return bool(all_finite(self.model.trainable_variables))

    def save(self, step):
        self.store.save(step)

    def probe(self):
        return self.run.fewshot(self.fewshot_features)

    def close(self):
        pass  # the state is the Keras model's own variables


def _export(model, export_base, version, trained_on, precision):
    from keras_mixer.serving.export import export_saved_model

    return export_saved_model(model, export_base, version=version, trained_on=trained_on, precision=precision)


def recipe_stream(strategy, source, config, seed, **kwargs):
    """The recipe's training batches of `source` under `strategy` (`run.recipe_pipeline_args`),
    seeded by `seed`. `kwargs`: more `train_pipeline` arguments (cache, skip_steps, permutation)."""
    return data.distribute(strategy, source, training=True, seed=seed, **recipe_pipeline_args(config), **kwargs)


def _epoch_stream(run, strategy, run_seed, epoch, skip_steps):
    """Epoch `epoch`'s training batches, a pure function of (run seed, epoch), from `skip_steps` on."""
    config = run.config
    seed = epoch_seed(run_seed, epoch)
    return recipe_stream(strategy, run.train_source, config, seed, cache=config.cache, skip_steps=skip_steps)
