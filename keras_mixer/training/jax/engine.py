"""The JAX engine of the training loop (`training.loop`): Keras' JAX backend, data-parallel over
every device of every host.

    start: several hosts: every process met (`cluster.join`), then jax.distributed; DataParallel
           over every device (`step.data_parallel`)
    build: model, optimizer, JaxTrainStep; its state in JAX arrays, donated to each step
    steps: host calls of up to `steps_per_loop` steps, each batch placed on the devices ahead of
           its step; the host reads the metrics once per call
    files: orbax checkpoints (`checkpoints`); the TF Serving export by TensorFlow, in a child process
    faults: several hosts stop at one agreed step on SIGTERM / Ctrl-C, and name a lost process
           (`preemption`)

The input is the TF engine's tf.data pipeline (TensorFlow as a data library only: it is kept off
the accelerators), each host reading its own shard of every global batch: step s sees the same
examples, crops and flips on either backend. The checkpointed state is the JaxTrainStep's
(trainable, non-trainable, optimizer variables; the dropout/drop-path RNG states are among the
non-trainable ones), the step and the run's data seed.
"""

import collections
import contextlib
import os

import jax
import keras
import numpy as np
from jax.experimental import multihost_utils

from keras_mixer.data.numpy_streams import train_stream
from keras_mixer.data.sources import tensorflow_installed
from keras_mixer.serving.export_process import export_in_child
from keras_mixer.training.fewshot import features_function
from keras_mixer.training.jax.checkpoints import orbax_store
from keras_mixer.training.jax.cluster import Presence, check_coordinator, join, read_environment
from keras_mixer.training.jax.evaluation import make_jax_evaluator
from keras_mixer.training.jax.preemption import PreemptionSync, lost_process
from keras_mixer.training.jax.step import JaxTrainStep, TrainState, data_parallel
from keras_mixer.training.optimizer import make_optimizer
from keras_mixer.training.peers import split_address
from keras_mixer.training.preparation import build_model, epoch_seed, recipe_pipeline_args
from keras_mixer.training.stops import StopSignals, TrainingDiverged, TrainingStopped

KIND = "jax data-parallel"
PREFETCH = 2  # batches placed on the devices ahead of the step that takes them
# Seconds without a heartbeat after which jax.distributed's coordination service declares a process
# dead and ends the others (a machine that vanished or hangs; a process that dies is noticed at once
# by the collective it leaves, `preemption.lost_process`). JAX's default is 100.
HEARTBEAT_SECONDS = 30


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
    """Joins the run's other hosts where it spans several; returns this process's
    `cluster.Presence` (to keep open while it runs) and {process id: its presence's "host:port"}
    of the others, or (None, {}) on one host.

    On GPU hosts, Keras' environment says where the others are (KERAS_DISTRIBUTION_JOB_ADDRESSES,
    _NUM_PROCESSES, _PROCESS_ID): every process meets the others first (`cluster.join`, a line every
    30 s, --cluster_timeout), then jax.distributed connects them. On a TPU VM (`--tpu`),
    jax.distributed finds the hosts itself and waits for them as it does (--cluster_timeout, no
    line). As `keras.distribution.initialize` does, every process then takes one random seed
    (Keras' initializers must draw the same weights on every host); unlike it, jax.distributed is
    given its timeouts: the start's, and a heartbeat of `HEARTBEAT_SECONDS`."""
    hosts = read_environment(os.environ)
    if hosts is None and config.tpu is None:
        return None, {}
    timeouts = dict(heartbeat_timeout_seconds=HEARTBEAT_SECONDS)
    if hosts is not None:
        check_coordinator(hosts)
        presence = Presence(towards=split_address(hosts.coordinator)[0])
        join(hosts, config.cluster_timeout)
        # Every process is there: connecting takes seconds, and a process that dies in between
        # ends the others at this timeout with jax.distributed's own fatal line.
        jax.distributed.initialize(
            hosts.coordinator, hosts.count, hosts.process_id, initialization_timeout=60, **timeouts
        )
    else:
        presence = Presence()
        jax.distributed.initialize(initialization_timeout=int(config.cluster_timeout), **timeouts)
    if jax.process_count() == 1:
        return None, {}
    keras.utils.set_random_seed(agreed(np.random.default_rng().integers(2**31 - 1)))
    addresses = _gathered(presence.address)
    return presence, {i: address for i, address in enumerate(addresses) if i != jax.process_index()}


def agreed(value):
    """Process 0's `value` (an integer below 2**31: JAX's integers are 32-bit), on every process."""
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def _gathered(text, size=64):
    """Every process's `text` (at most `size` bytes of ASCII), in process order."""
    mine = np.frombuffer(text.encode().ljust(size), np.uint8)
    return [bytes(row).decode().strip() for row in multihost_utils.process_allgather(mine)]


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


class JaxEngine:
    """`loop.Engine` on Keras' JAX backend: the JaxTrainStep's state in JAX arrays (donated to each
    step), batches placed on the devices ahead of their steps, orbax checkpoints."""

    kind = KIND
    queues_steps = True  # each step is dispatched without waiting; the host reads the metrics at the end

    def start(self, config):
        check_jax_fields(config)
        # The presence stays open while the process runs: the other hosts probe it (`running`).
        self.presence, self.presences = initialize_hosts(config)
        _keep_tensorflow_off_the_accelerators()
        devices = jax.devices()
        self.chief, self.replicas, self.process_index = jax.process_index() == 0, len(devices), jax.process_index()
        if self.chief:
            names = ", ".join(f"{d.platform}:{d.id}" for d in devices)
            print(
                f"Keras on jax, DataParallel over {len(devices)} device(s) on {jax.process_count()} host(s): {names}",
                flush=True,
            )
        self.place = data_parallel()  # before the model is built: its variables go to every device

    def stop_signals(self):
        # Several hosts save collectively: one cannot checkpoint on its own when signalled.
        return PreemptionSync() if jax.process_count() > 1 else StopSignals()

    def build(self, run, first_seed):
        config, self.run = run.config, run
        if jax.process_count() > 1:
            first_seed = agreed(first_seed)  # every host reads its shard of one stream
        if config.seed is not None and tensorflow_installed():
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()  # the input pipeline's, as on TensorFlow
        self.model = build_model(config, run.train_source.num_classes)
        self.optimizer = make_optimizer(run.total_steps, self.model.trainable_variables, **config.optimizer_args())
        self.train_step = JaxTrainStep(self.model, self.optimizer, clip_norm=config.grad_clip_norm)
        self.state, self.run_seed = self.train_step.initial_state(), first_seed
        self.store = orbax_store(os.path.join(run.workdir, "checkpoints"), config.keep_checkpoints, run.chief)
        return self.model

    def _checkpoint(self, step):
        """The pytree saved at `step`: the step's state, the step and the run's data seed."""
        return dict(
            trainable=self.state.trainable,
            non_trainable=self.state.non_trainable,
            optimizer=self.state.optimizer,
            step=np.asarray(step, np.int64),
            run_seed=np.asarray(self.run_seed, np.int64),
        )

    def restore(self):
        step, saved = self.store.restore_newest(self._checkpoint(0))
        if step is not None:
            self.state = TrainState(saved["trainable"], saved["non_trainable"], saved["optimizer"])
            self.run_seed = int(saved["run_seed"])
        self.state = self.place.replicate(self.state)
        self.step = step or 0
        return step

    def compile(self, run):
        config = run.config
        evaluate = make_jax_evaluator(
            self.model, run.eval_source, config.batch_size, config.image_size, config.eval_preprocessing, self.place
        )
        self.evaluate = lambda: evaluate(self.state.trainable, self.state.non_trainable)
        self._features = features_function(self.model) if run.fewshot else None
        jnp = jax.numpy
        self.finite = jax.jit(lambda arrays: jnp.all(jnp.array([jnp.isfinite(a).all() for a in arrays])))
        return True, "XLA compiles the whole training step (Keras' JAX backend)"

    @contextlib.contextmanager
    def running(self, report):
        try:
            yield
        except (TrainingStopped, TrainingDiverged):
            raise  # every process stops there together
        except Exception as e:
            # A lost process surfaces wherever the others meet it: a step's collective (a
            # JaxRuntimeError), reading a result (a ValueError), an orbax save (orbax's errors).
            # Whatever the type, the probe of the others decides.
            lost = lost_process(e, self.presences, report.metrics["step"], self.store) if self.presences else None
            if lost is None:
                raise
            if getattr(e, "stderr_fd", None) is not None:  # a failed save muted standard error
                lost.stderr_fd = e.stderr_fd
            raise lost from None

    def between_calls(self, step):
        pass

    def open_epoch(self, epoch, skip_steps):
        self.batches = _on_devices(_host_batches(self.run, self.run_seed, epoch, skip_steps), self.place)

    def train(self, count, stop_at):
        queued = []
        while len(queued) < count:
            self.state, metrics = self.train_step(self.state, *next(self.batches))
            queued.append(metrics)
            self.step += 1
            if stop_at(self.step):  # asked after every step: hosts agree on a step by its number
                break
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
        self.store.save(step, self._checkpoint(step))

    def features(self):
        self.train_step.write_back(self.state)  # the probe reads the model's variables
        return self._features

    def close(self):
        self.train_step.write_back(self.state)  # the final weights into the model (and optimizer)

    def export(self, model, export_base, version, trained_on, precision):
        model_path = os.path.join(self.run.workdir, "model.keras")  # `loop.finish` wrote it, with `trained_on`
        return export_in_child(model_path, export_base, version, precision)


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
