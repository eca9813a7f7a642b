"""A compiled training step for the JAX backend, with the model's state kept on the device.

    step = keras_mixer.JaxTrainStep(model, keras.optimizers.AdamW(1e-3, weight_decay=0.1), clip_norm=1.0)
    state = step.initial_state()
    for images, labels in batches:              # [B, H, W, 3]; labels [B] ints or [B, classes] (mixup)
        state, metrics = step(state, images, labels)
    step.write_back(state)                      # into model.variables and optimizer.variables

Over several devices (and hosts): `place = keras_mixer.training.jax.step.data_parallel()` before building the
model, then `step(state, *place((images, labels)))` with each host's part of the global batch.

One XLA program per step: forward (`model.stateless_call`), backward (`jax.value_and_grad`),
clipping at the global gradient norm (as the paper), and the optimizer's update
(`optimizer.stateless_apply`, so schedules and weight-decay exclusions behave as in Keras). The
state's buffers are donated: each step reuses the memory of the state it was given, so that state
must not be used again.

Why not `model.train_on_batch`: it computes the same step but writes every model and optimizer
variable back after each call; on an H100 that made B/16's step 14 % slower (bfloat16, batch
128). Here nothing returns to the host unless the caller reads `metrics`. The model's own `losses`
(regularisers) are not added: keras_mixer's models have none. No loss scaling: train in float32
or bfloat16 (`mixed_bfloat16`), not float16.
"""

from typing import NamedTuple

import keras


class TrainState(NamedTuple):
    """Everything a step changes, as JAX arrays in the order of the Keras variable lists."""

    trainable: list  # model.trainable_variables
    non_trainable: list  # model.non_trainable_variables (random-seed states among them)
    optimizer: list  # optimizer.variables (iterations, moments)


class JaxTrainStep:
    """`step(state, images, labels) -> (new state, {"loss", "gradient_norm", "top1"})`, jitted
    (top1: the share of the batch whose largest logit is its label, or its largest-weight label).

    Args:
        model: a Keras model whose outputs are logits [B, classes] (classifier_activation=None).
        optimizer: a Keras optimizer; built here for the model's trainable variables if needed.
            One that clips itself (clipnorm, global_clipnorm, clipvalue) is refused while
            `clip_norm` is set: the step clips.
        clip_norm: the global gradient norm is scaled down to at most this; None: no clipping.
    """

    def __init__(self, model, optimizer, clip_norm=1.0):
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm!r}")
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "JaxTrainStep does not scale the loss: train in float32 or mixed_bfloat16, without a LossScaleOptimizer"
            )
        clipping = {
            k: getattr(optimizer, k) for k in ("clipnorm", "global_clipnorm", "clipvalue") if getattr(optimizer, k)
        }
        if clipping and clip_norm is not None:
            setting = ", ".join(f"{k}={v}" for k, v in clipping.items())
            raise ValueError(f"the optimizer clips too ({setting}): leave its clipping unset, or pass clip_norm=None")
        backend = keras.backend.backend()
        if backend != "jax":
            raise RuntimeError(
                f"JaxTrainStep needs the JAX backend; this process runs Keras on {backend!r}: set KERAS_BACKEND=jax"
            )
        import jax

        self.model = model
        self.optimizer = optimizer
        self.clip_norm = clip_norm
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        self._step = jax.jit(self._update, donate_argnums=0)

    def initial_state(self):
        """Copies of the model's and the optimizer's current variable values (copies, because the
        step donates them: the Keras variables stay readable until `write_back`)."""
        import jax.numpy as jnp

        return TrainState(*([jnp.array(v.value, copy=True) for v in variables] for variables in self._variables()))

    def __call__(self, state, images, labels):
        return self._step(state, images, labels)

    def write_back(self, state):
        """Assigns `state` to the model's and the optimizer's variables (to save or evaluate)."""
        for variables, values in zip(self._variables(), state):
            for variable, value in zip(variables, values):
                variable.assign(value)

    def _variables(self):
        """The Keras variable lists, in TrainState's order."""
        return self.model.trainable_variables, self.model.non_trainable_variables, self.optimizer.variables

    def _update(self, state, images, labels):
        import jax
        import jax.numpy as jnp

        def loss_of(trainable):
            logits, non_trainable = self.model.stateless_call(trainable, state.non_trainable, images, training=True)
            return cross_entropy(logits, labels), (non_trainable, logits)

        (loss, (non_trainable, logits)), gradients = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
        truth = labels if labels.ndim == 1 else jnp.argmax(labels, axis=1)
        top1 = jnp.mean(jnp.argmax(logits, axis=1) == truth.astype(jnp.int32))
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in gradients))
        if self.clip_norm is not None:
            scale = jnp.minimum(1.0, self.clip_norm / jnp.maximum(norm, 1e-12))
            gradients = [g * scale.astype(g.dtype) for g in gradients]
        trainable, optimizer = self.optimizer.stateless_apply(state.optimizer, gradients, state.trainable)
        return TrainState(trainable, non_trainable, optimizer), {"loss": loss, "gradient_norm": norm, "top1": top1}


def data_parallel():
    """Data parallelism over every device of every host, the Keras way: sets Keras'
    `DataParallel` over all devices as the global distribution (the models and optimizers built
    next keep a replica of each variable on every device) and returns `place`.

    place(batch): a pytree of this host's part of the global batch, NumPy arrays [B_local, ...]
    -> JAX arrays [B_global, ...] split along the batch axis over the devices (B_global = B_local
    x hosts). A `JaxTrainStep` given them runs on every device at once, and its mean loss and
    gradients are those of the global batch: the same step as on one device, summed in another
    order. Several hosts: call `keras.distribution.initialize()` first.

    place.replicate(state): a pytree (a `TrainState`) replicated on every device, laid out as the
    step returns it, so the step compiles once.
    """
    import jax
    import numpy as np

    devices = jax.devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices), ("batch",)), jax.sharding.PartitionSpec("batch")
    )

    mesh = sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(batch):
        return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

    # A step's outputs (the next state) come replicated over the mesh. A first state laid out
    # otherwise (a fresh model's uncommitted arrays, a restored checkpoint's) would compile the
    # step a second time at the second step: 9 s of a 2-core CPU's steady state for S/16.
    place.replicate = lambda tree: jax.device_put(tree, replicated)
    return place


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy in float32. logits [B, K]; labels [B] class ids or [B, K]
    probabilities (mixup, label smoothing)."""
    import jax
    import jax.numpy as jnp

    log_probabilities = jax.nn.log_softmax(logits.astype(jnp.float32))
    if labels.ndim == 1:
        return -jnp.take_along_axis(log_probabilities, labels[:, None].astype(jnp.int32), axis=1).mean()
    return -(labels.astype(jnp.float32) * log_probabilities).sum(axis=1).mean()
