"""One training step on every tf.distribute engine, and its clipping (the optimizer: `optimizer`).

    per replica:  loss = CE(labels, model(images)) / global batch      (XLA-compiled fwd + bwd)
    all-reduce:   g = sum over replicas of dloss/dw                    (the full-batch gradient)
    clip:         g *= min(1, clip / ||g||)                            (global norm, as the paper)
    apply:        optimizer.apply(g / replicas)   (Keras sums replicas' gradients again itself)

Why not `model.fit`: in Keras 3.15 it fails under MultiWorkerMirroredStrategy, and the paper's
clipping must act on the *global* gradient. On one replica XLA compiles the whole step (forward,
backward, clipping, update: one program, no per-variable update ops); with several replicas only
forward and backward, as the all-reduce (merge_call) cannot run inside XLA. Without XLA (bfloat16
on CPUs with bf16 units, or `--xla off`) the products run in TF's oneDNN kernels, the model's
elementwise work in small XLA pieces (`keras_mixer.model.fused_ops`), and on one replica the clipping and
update in one more.
"""

import contextlib

import keras
import tensorflow as tf

from keras_mixer.model import cpu_units, fused_ops


def clip_by_global_norm(gradients, max_norm):
    """(gradients scaled so their global norm is at most `max_norm`, the norm before clipping).
    `max_norm` None: no clipping."""
    norm = tf.linalg.global_norm(gradients)
    if max_norm is None:
        return gradients, norm
    scale = tf.minimum(1.0, max_norm / tf.maximum(norm, 1e-12))
    return [g * scale for g in gradients], norm


def decide_xla(xla, mixed_precision, kind):
    """Whether XLA compiles the step. `--xla on|off` is obeyed; `auto` decides per device and
    precision from what measured faster (`benchmarks/compare.py`, docs/speed.md):

    - TPU: no separate compile, the TPU strategy compiles everything anyway.
    - bfloat16 on a CPU with bf16 matrix units (AMX-BF16, AVX512-BF16): off. XLA's CPU backend
      does not use those units and TF's oneDNN kernels do (S/16 step 9.7 -> 22.6 img/s on a Xeon
      with AMX); the elementwise ops still run as fused XLA pieces (`keras_mixer.model.fused_ops`).
    - Otherwise on (GPUs; a CPU in float32, where it is as fast as oneDNN, and Keras'
      jit_compile="auto" would turn it off on CPU and under tf.distribute).

    Args:
        xla: the recipe's "auto", "on" or "off"; mixed_precision: its compute dtype or None;
        kind: the strategy kind (`strategy.choose_strategy`).

    Returns (on, the reason in words), which the trainers print."""
    if xla != "auto":
        on, why = xla == "on", f"--xla {xla}"
    elif kind == "tpu":
        on, why = False, "the TPU strategy compiles the whole step itself"
    elif mixed_precision == "bfloat16" and cpu_units.has_bf16_units() and not tf.config.list_logical_devices("GPU"):
        units = ", ".join(f for f in cpu_units.matrix_features() if "BF16" in f)
        on, why = False, f"bfloat16 on a CPU with {units}: TF's oneDNN kernels use them, XLA's CPU backend does not"
    else:
        on, why = True, "--xla auto (XLA compiles the step on GPUs, and on CPUs in float32 or without bf16 units)"
    return on, why


def single_replica(strategy):
    """True for one replica on one machine: no all-reduce between the gradients and the update, so
    XLA can compile the whole step."""
    distributed = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy, tf.distribute.TPUStrategy)
    return strategy.num_replicas_in_sync == 1 and not isinstance(strategy, distributed)


def make_train_steps(strategy, model, optimizer, step_var, *, global_batch, clip_norm, use_xla, whole_step=None):
    """A tf.function (iterator, count) -> (mean loss, mean gradient norm, train top-1) that runs
    `count` steps in one host call and advances `step_var` by `count`.

    The iterator yields (images [global_batch / replicas, H, W, 3], one-hot labels [same, classes])
    per replica. `clip_norm`: the global gradient norm clipped to (None: no clipping). With
    `use_xla`, XLA compiles the forward and backward pass, and with `whole_step` (default: on a
    single replica) the clipping and the optimizer update as well. A `LossScaleOptimizer`
    (`make_optimizer(loss_scaling=True)`) gets its loss scaled and its true gradient clipped."""
    whole_step = use_xla and (single_replica(strategy) if whole_step is None else whole_step)
    replicas = strategy.num_replicas_in_sync
    fp16 = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    # XLA fuses a whole step's elementwise ops itself: the model then emits plain ops only.
    ops_context = fused_ops.plain_ops if use_xla else contextlib.nullcontext

    def forward_backward(images, labels):
        with tf.GradientTape() as tape, ops_context():
            logits = tf.cast(model(images, training=True), tf.float32)
            per_example = keras.losses.categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss) if fp16 else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        correct = tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == tf.argmax(labels, -1), tf.float32))
        return loss, gradients, correct

    forward_backward_fn = (
        tf.function(forward_backward, jit_compile=True) if use_xla and not whole_step else forward_backward
    )

    def update(gradients):
        """Clips the all-reduced gradients and applies them; returns their norm before clipping."""
        if fp16:  # clip the true gradient; the loss-scale optimizer unscales and skips overflows
            unscaled, norm = clip_by_global_norm([g / optimizer.dynamic_scale for g in gradients], clip_norm)
            gradients = [g * optimizer.dynamic_scale for g in unscaled]
        else:
            gradients, norm = clip_by_global_norm(gradients, clip_norm)
        optimizer.apply([g / replicas for g in gradients], model.trainable_variables)
        return norm

    if not whole_step and single_replica(strategy) and fused_ops.xla_pieces(training=True):
        # The products run without XLA (oneDNN), but the optimizer's hundreds of small
        # per-variable ops fuse into one XLA piece (S/16 step: 120 ms of them become ~20).
        update = tf.function(update, jit_compile=True)

    def replica_step(images, labels):
        loss, gradients, correct = forward_backward_fn(images, labels)
        norm = update(tf.distribute.get_replica_context().all_reduce("sum", gradients))
        return loss, norm, correct

    step_fn = tf.function(replica_step, jit_compile=True) if whole_step else replica_step

    @tf.function
    def train_steps(iterator, count):
        loss_sum, norm_sum, correct_sum = tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)
        for _ in tf.range(count):
            images, labels = next(iterator)
            loss, norm, correct = strategy.run(step_fn, args=(images, labels))
            loss_sum += strategy.reduce("SUM", loss, axis=None)
            norm_sum += strategy.reduce("MEAN", norm, axis=None)
            correct_sum += strategy.reduce("SUM", correct, axis=None)
            step_var.assign_add(1)
        count = tf.cast(count, tf.float32)
        return loss_sum / count, norm_sum / count, correct_sum / (count * global_batch)

    return train_steps


@tf.function
def all_finite(variables):
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables])
