"""The TensorFlow engine of the training loop (`training.loop`): every tf.distribute strategy.

A step is `step.make_train_steps`' tf.function of `steps_per_loop` steps over the strategy's
iterator; the state is the Keras model's and optimizer's variables, a step counter and the run's
data seed, checkpointed as one tf.train.Checkpoint (`checkpoints`). A multi-worker run stops at one
step on every worker when one is preempted, and names a lost worker (`preemption`).
"""

import contextlib
import os

import tensorflow as tf

from keras_mixer import data
from keras_mixer.training.fewshot import features_function
from keras_mixer.training.optimizer import make_optimizer
from keras_mixer.training.preparation import build_model, epoch_seed, recipe_pipeline_args
from keras_mixer.training.stops import StopSignals
from keras_mixer.training.tf.checkpoints import checkpoint_store
from keras_mixer.training.tf.cluster import read_tf_config
from keras_mixer.training.tf.evaluation import make_evaluator
from keras_mixer.training.tf.step import all_finite, decide_xla, make_train_steps
from keras_mixer.training.tf.strategy import choose_strategy, is_chief, make_strategy, replica_devices, task_id


class TfEngine:
    """`loop.Engine` on tf.distribute, under `strategy` (else one made from the recipe's
    `strategy` field when the run starts)."""

    queues_steps = False  # a call of `count` steps is one tf.function run: steps_per_loop sizes it

    def __init__(self, strategy=None):
        self.strategy = strategy
        self.stop = None  # a multi-worker run's preemption.MultiWorkerStop

    def start(self, config):
        if self.strategy is None:
            tf_config = os.environ.get("TF_CONFIG")
            gpus = len(tf.config.list_physical_devices("GPU"))
            self.kind = choose_strategy(config.strategy, config.tpu, tf_config, gpus)
            self.strategy = make_strategy(self.kind, config.tpu, tf_config, config.cluster_timeout)
        else:
            self.kind = type(self.strategy).__name__
        self.chief, self.replicas = is_chief(self.strategy), self.strategy.num_replicas_in_sync
        self.process_index = task_id(self.strategy)
        if self.chief:
            devices = ", ".join(replica_devices(self.strategy))
            print(f"Keras on tensorflow, {self.kind} strategy, {self.replicas} replica(s): {devices}", flush=True)

    def stop_signals(self):
        # Multi-worker: TensorFlow's preemption handler stops every worker at one step (`running`).
        return StopSignals(enabled=not self._multi_worker())

    def _multi_worker(self):
        return getattr(self.strategy.extended, "_in_multi_worker_mode", lambda: False)()

    def build(self, run, first_seed):
        config, self.run = run.config, run
        if config.seed is not None:
            tf.config.experimental.enable_op_determinism()
        with self.strategy.scope():
            model = build_model(config, run.train_source.num_classes)
            optimizer = make_optimizer(run.total_steps, model.trainable_variables, **config.optimizer_args())
            self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.run_seed = tf.Variable(first_seed, dtype=tf.int64, trainable=False, name="run_seed")
        self.model, self.optimizer = model, optimizer
        # Keras' seed-generator states (stochastic depth, dropout) are not among the variables a
        # tf.train.Checkpoint finds through the model: save them by name, or a resumed run would draw
        # other masks than an uninterrupted one.
        rng_states = {v.path.replace("/", "."): v for v in model.non_trainable_variables if "seed_generator" in v.path}
        state = tf.train.Checkpoint(
            model=model, optimizer=optimizer, step=self.step_var, run_seed=self.run_seed, rng_states=rng_states
        )
        # Every worker must write (saving is collective); only the chief's copy is kept.
        write_dir = None if run.chief else os.path.join(run.workdir, f".tmp_worker_{self.process_index}")
        folder = os.path.join(run.workdir, "checkpoints")
        self.store = checkpoint_store(state, folder, config.keep_checkpoints, write_dir)
        return model

    def restore(self):
        return self.store.restore_newest()[0]

    def compile(self, run):
        config = run.config
        use_xla, reason = decide_xla(config.xla, config.mixed_precision, run.kind)
        self.steps = make_train_steps(
            self.strategy, self.model, self.optimizer, self.step_var, use_xla=use_xla, **config.step_args()
        )
        self.evaluate = make_evaluator(
            self.strategy,
            lambda images: self.model(images, training=False),
            run.eval_source,
            config.batch_size,
            config.image_size,
            config.eval_preprocessing,
        )
        # The probe reads the model in inference mode only: no dropout or drop-path draws, no training data.
        self._features = features_function(self.model) if run.fewshot else None
        return use_xla, f"XLA {'on' if use_xla else 'off'} for the training step: {reason}"

    @contextlib.contextmanager
    def running(self, report):
        if not self._multi_worker():
            yield
            return
        from keras_mixer.training.tf.preemption import PEER_ERRORS, MultiWorkerStop, lost_worker

        def save(at):  # a checkpoint as any other, and metrics.json with it
            self.store.save(at)
            report.save()

        self.stop = MultiWorkerStop(self.strategy, save, self.store, self.run.total_steps)
        try:
            yield
        except PEER_ERRORS as e:
            cluster = read_tf_config(os.environ.get("TF_CONFIG"))
            raise lost_worker(e, cluster, report.metrics["step"], self.store) from None
        finally:
            self.stop.close()

    def between_calls(self, step):
        if self.stop is not None:
            self.stop.check(step)

    def open_epoch(self, epoch, skip_steps):
        config, seed = self.run.config, epoch_seed(int(self.run_seed.numpy()), epoch)
        source = self.run.train_source
        self.iterator = iter(
            recipe_stream(self.strategy, source, config, seed, cache=config.cache, skip_steps=skip_steps)
        )

    def train(self, count, stop_at):
        return count, *(float(v) for v in self.steps(self.iterator, tf.constant(count)))

    def learning_rate(self, step):
        return float(self.optimizer.learning_rate)  # the optimizer's own step count is `step`

    def weights_finite(self):
        return bool(all_finite(self.model.trainable_variables))

    def save(self, step):
        self.store.save(step)

    def features(self):
        return self._features

    def close(self):
        pass  # the state is the Keras model's own variables

    def export(self, model, export_base, version, trained_on, precision):
        from keras_mixer.serving.export import export_saved_model

        return export_saved_model(model, export_base, version=version, trained_on=trained_on, precision=precision)


def recipe_stream(strategy, source, config, seed, **kwargs):
    """The recipe's training batches of `source` under `strategy` (`preparation.recipe_pipeline_args`),
    seeded by `seed`. `kwargs`: more `train_pipeline` arguments (cache, skip_steps, permutation)."""
    return data.distribute(strategy, source, training=True, seed=seed, **recipe_pipeline_args(config), **kwargs)
