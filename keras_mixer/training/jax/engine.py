"""The training loop on Keras' JAX backend: the same recipes, workdir and guarantees as `loop`
(TensorFlow), data-parallel over every device of every host.

    train_jax(config)                    (`trainer.train` hands a JAX-backend process here)
      -> several hosts: keras.distribution.initialize (jax.distributed)
      -> lock the workdir, catch SIGTERM/SIGINT, run.prepare (as on TensorFlow)
      -> DataParallel over every device (`jax_step.data_parallel`); model, optimizer, JaxTrainStep
      -> restore the newest intact orbax checkpoint (`orbax_store`, the same walk-back rule)
      -> host calls of up to `steps_per_loop` steps, each batch placed on the devices ahead of its
         step; report, checkpoint, evaluation (`jax_evaluation`) and few-shot probe when due
      -> run.finish: model.keras, the TF Serving export (by TensorFlow, in a child process), metrics.json

The input is the TF trainer's tf.data pipeline (TensorFlow as a data library only: it is kept off
the accelerators), each host reading its own shard of every global batch: step s sees the same
examples, crops and flips on either backend. The checkpointed state is the JaxTrainStep's
(trainable, non-trainable, optimizer variables; the dropout/drop-path RNG states are among the
non-trainable ones), the step and the run's data seed.
"""

import collections
import os
import subprocess
import sys

import keras
import numpy as np

from keras_mixer.data.numpy_streams import train_stream
from keras_mixer.data.sources import tensorflow_installed
from keras_mixer.training.jax.checkpoints import OrbaxStore
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
from keras_mixer.training.tf.checkpoints import NoCheckpointRestores
from keras_mixer.training.workdir import WorkdirLock, check_workdir

KIND = "jax data-parallel"
PREFETCH = 2  # batches placed on the devices ahead of the step that takes them


def check_jax_fields(config):
    """Raises ValueError (one line) for a recipe field that means nothing on the JAX backend."""
    if config.strategy not in ("auto", "tpu"):
        raise ValueError(
            f"--strategy {config.strategy} is a tf.distribute strategy; on Keras' JAX backend the trainer is "
            f"data-parallel over every device of every host (keras.distribution.DataParallel): leave --strategy unset"
        )
    if config.tpu not in (None, "local"):
        raise ValueError(
            f"--tpu {config.tpu}: on Keras' JAX backend, start the same command on every host of the TPU VM with "
            f"a bare --tpu (JAX finds its TPU and the other hosts itself); a TPU name is resolved by TensorFlow only"
        )
    if config.xla == "off":
        raise ValueError("--xla off: on Keras' JAX backend XLA compiles every step; leave --xla unset (auto)")
    if config.mixed_precision == "float16":
        raise ValueError(
            "--mixed_precision float16 needs loss scaling, which the JAX trainer does not do: use bfloat16 "
            "(the same range as float32) or none"
        )


def initialize_hosts(config):
    """`keras.distribution.initialize` (jax.distributed) where the run spans hosts: on a TPU VM
    (`--tpu`, which finds its hosts itself) or when KERAS_DISTRIBUTION_JOB_ADDRESSES and
    KERAS_DISTRIBUTION_NUM_PROCESSES / _PROCESS_ID say where the others are (GPU hosts)."""
    if config.tpu is not None or os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES"):
        keras.distribution.initialize()


def _keep_tensorflow_off_the_accelerators():
    """TensorFlow reads and augments the input on the CPU only: left alone it would take the GPUs'
    memory that JAX needs."""
    if not tensorflow_installed():
        return
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices in this process
        pass


def train_jax(config, restart=False, accept_changes=()):
    """`trainer.train` on Keras' JAX backend: trains as `config` says and returns the final metrics."""
    import jax

    from keras_mixer.training.jax.step import data_parallel

    check_jax_fields(config)
    check_workdir(config.workdir)
    initialize_hosts(config)
    _keep_tensorflow_off_the_accelerators()
    chief = jax.process_index() == 0
    devices = jax.devices()
    if chief:
        names = ", ".join(f"{d.platform}:{d.id}" for d in devices)
        print(
            f"Keras on jax, DataParallel over {len(devices)} device(s) on {jax.process_count()} host(s): {names}",
            flush=True,
        )
    lock = WorkdirLock(config.workdir).acquire() if chief else None
    try:
        # Several hosts save collectively: one cannot checkpoint on its own when signalled.
        with StopSignals(enabled=jax.process_count() == 1) as signals:
            place = data_parallel()  # before the model is built: its variables go to every device
            run = prepare(config, KIND, chief, len(devices), restart, tuple(accept_changes))
            if config.seed is not None and tensorflow_installed():
                import tensorflow as tf

                tf.config.experimental.enable_op_determinism()  # the input pipeline's, as on TensorFlow
            return _train(run, place, signals)
    finally:
        if lock is not None:
            lock.release()


def _checkpoint(state, step, run_seed):
    """The pytree saved at `step`: the step's state, the step and the run's data seed."""
    return dict(
        trainable=state.trainable,
        non_trainable=state.non_trainable,
        optimizer=state.optimizer,
        step=np.asarray(step, np.int64),
        run_seed=np.asarray(run_seed, np.int64),
    )


def _resume(run, store, state, run_seed):
    """(step restored or None, state, run seed, metrics.json so far) from the newest intact
    checkpoint; a run whose checkpoints were all moved to broken/ earlier is refused."""
    from keras_mixer.training.jax.step import TrainState

    step, saved = store.restore_newest(_checkpoint(state, 0, run_seed))
    if step is None:
        if os.path.isdir(os.path.join(store.directory, "broken")):
            raise NoCheckpointRestores(
                f"{store.directory} holds only checkpoints that were moved to broken/ earlier; pass --restart to "
                f"start again from step 0 (the current files are moved to WORKDIR/previous/, not deleted)"
            )
        return None, state, run_seed, {}
    state = TrainState(saved["trainable"], saved["non_trainable"], saved["optimizer"])
    return step, state, int(saved["run_seed"]), previous_metrics(run, step)


def _train(run, place, signals):
    import jax

    from keras_mixer.training.jax.evaluation import make_jax_evaluator
    from keras_mixer.training.jax.step import JaxTrainStep

    config = run.config
    model = build_model(config, run.train_source.num_classes)
    optimizer = make_optimizer(run.total_steps, model.trainable_variables, **config.optimizer_args())
    train_step = JaxTrainStep(model, optimizer, clip_norm=config.grad_clip_norm)
    first_seed = config.seed if config.seed is not None else int(np.random.default_rng().integers(2**31 - 1))
    store = OrbaxStore(os.path.join(run.workdir, "checkpoints"), config.keep_checkpoints, run.chief)
    resumed_from, state, run_seed, previous = _resume(run, store, train_step.initial_state(), first_seed)
    state = place.replicate(state)
    if already_finished(run, resumed_from, previous):
        return previous
    if run.chief:
        if resumed_from is not None:
            print(f"Resumed from step {resumed_from} ({store.latest()})", flush=True)
        write_record(run, model, resumed_from)
        print("XLA compiles the whole training step (Keras' JAX backend)", flush=True)

    evaluate = make_jax_evaluator(
        model, run.eval_source, config.batch_size, config.image_size, config.eval_preprocessing, place
    )
    fewshot_features = _features_function(model) if run.fewshot else None
    step = resumed_from or 0
    report = make_report(run, step, resumed_from, previous, use_xla=True)
    engine = _Engine(run, place, train_step, state, run_seed, store, optimizer, evaluate, fewshot_features)
    train_steps(run, engine, report, signals, step)
    if config.write_worker_weights:
        from keras_mixer.weights_io.official_keys import save_npz

        folder = run.workdir if run.chief else os.path.join(run.workdir, f"worker_{jax.process_index()}")
        os.makedirs(folder, exist_ok=True)
        save_npz(model, os.path.join(folder, "final_weights.npz"))
    if run.chief:
        model_path = os.path.join(run.workdir, "model.keras")
        finish(run, model, report, lambda _, *args: export_in_tensorflow(model_path, *args))
    return report.metrics


class _Engine:
    """`run.Engine` on Keras' JAX backend: the JaxTrainStep's state in JAX arrays (donated to each
    step), batches placed on the devices ahead of their steps, orbax checkpoints."""

    queues_steps = True  # each step is dispatched without waiting; the host reads the metrics at the end

    def __init__(self, run, place, train_step, state, run_seed, store, optimizer, evaluate_fn, fewshot_features):
        import jax

        self.run, self.place, self.train_step, self.state = run, place, train_step, state
        self.run_seed, self.store, self.optimizer, self.evaluate_fn = run_seed, store, optimizer, evaluate_fn
        self.fewshot_features = fewshot_features
        jnp = jax.numpy
        self.finite = jax.jit(lambda arrays: jnp.all(jnp.array([jnp.isfinite(a).all() for a in arrays])))
        self.batches = None

    def open_epoch(self, epoch, skip_steps):
        self.batches = _on_devices(_host_batches(self.run, self.run_seed, epoch, skip_steps), self.place)

    def train(self, count, stopped):
        import jax

        queued = []
        while len(queued) < count and not (queued and stopped()):  # a signal ends the call at the step in flight
            self.state, metrics = self.train_step(self.state, *next(self.batches))
            queued.append(metrics)
        # Read once, after the last step was dispatched: an operation on a step's metrics in
        # between (summing them as they come) makes the host wait for that step and drains the
        # queue of dispatched steps, which cost 7-8 % of a step on a 2-core CPU.
        values = jax.device_get(queued)
        return len(queued), *(float(np.mean([v[k] for v in values])) for k in ("loss", "gradient_norm", "top1"))

    def learning_rate(self, step):
        # The JAX step keeps the optimizer's step count in its state, not in `optimizer.iterations`.
        self.optimizer.iterations.assign(step)
        return float(self.optimizer.learning_rate)

    def weights_finite(self):
        return bool(self.finite(self.state.trainable))

    def save(self, step):
        self.store.save(step, _checkpoint(self.state, step, self.run_seed))

    def evaluate(self):
        return self.evaluate_fn(self.state.trainable, self.state.non_trainable)

    def probe(self):
        self.train_step.write_back(self.state)  # the probe reads the model's variables
        return self.run.fewshot(self.fewshot_features)

    def between_calls(self, step):
        pass  # no preemption agreement on JAX: each process stops on its own signal

    def close(self):
        self.train_step.write_back(self.state)  # the final weights into the model (and optimizer)


def _host_batches(run, run_seed, epoch, skip_steps):
    """This host's part of epoch `epoch`'s global batches as NumPy arrays, from `skip_steps` on:
    the TF trainer's stream (`run.epoch_seed`), read in shards of batch_size / hosts (without
    TensorFlow: the NumPy reader's stream of the same seed)."""
    import jax

    return train_stream(
        run.train_source,
        host=jax.process_index(),
        hosts=jax.process_count(),
        seed=epoch_seed(run_seed, epoch),
        cache=run.config.cache,
        skip_steps=skip_steps,
        **recipe_pipeline_args(run.config),
    )


def _on_devices(batches, place):
    """`batches` placed on the devices (split along the batch axis) `PREFETCH` ahead: the copy to
    the devices of the next batches overlaps the running step."""
    ahead = collections.deque()
    for batch in batches:
        ahead.append(place(batch))
        if len(ahead) > PREFETCH:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


def _features_function(model):
    """images [B, H, W, 3] -> pre-logits [B, C] from the model's variables (written back first)."""
    import jax

    from keras_mixer.training.fewshot import prelogit_model

    features = prelogit_model(model)
    call = jax.jit(lambda trainable, other, images: features.stateless_call(trainable, other, images)[0])

    def features_fn(images):
        variables = (features.trainable_variables, features.non_trainable_variables)
        return call(*([v.value for v in vs] for vs in variables), np.asarray(images))

    return features_fn


def export_in_tensorflow(model_path, export_base, version, trained_on, precision):
    """The TF Serving export of `model_path` (a .keras file carrying `trained_on`), written by
    `trainers/export.py` on Keras' TensorFlow backend in a child process on the CPU (the SavedModel's
    graph is TensorFlow's; one process runs one Keras backend). Without TensorFlow: a note, None."""
    if not tensorflow_installed():
        print(
            f"TensorFlow is not installed here, so no TF Serving export was written. On a machine with it: "
            f"python trainers/export.py --source {model_path} --export_base {export_base}",
            flush=True,
        )
        return None
    command = [
        sys.executable,
        "-m",
        "keras_mixer.programs.export_program",
        *("--source", model_path, "--export_base", export_base, "--version", str(version)),
        *("--precision", precision),
    ]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        why = lines[-1][len("error: ") :] if lines else result.stderr.strip()[-500:]
        raise OSError(f"the TF Serving export failed ({why}); model.keras is written: rerun the same command")
    return os.path.join(export_base, str(version))
