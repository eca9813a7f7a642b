"""The recipe's optimizer and precision policy, the same on either Keras backend (no TensorFlow)."""

import keras

from keras_mixer.training.schedules import WarmupDecay


def make_optimizer(
    total_steps,
    variables=None,
    *,
    optimizer="adamw",
    learning_rate,
    warmup_steps=0,
    schedule="warmup_linear",
    weight_decay=0.1,
    momentum=0.9,
    beta_1=0.9,
    beta_2=0.999,
    loss_scaling=False,
):
    """AdamW (pre-training) or SGD with momentum (fine-tuning) on a warmup-then-decay schedule of
    `total_steps`; the keywords are the recipe's fields of those names (`TrainConfig.optimizer_args`).

    Clipping is not set here: the step clips the all-reduced gradient. Weight decay is decoupled
    (Keras AdamW: w -= lr * wd * w) and spares biases and LayerNorm parameters. `loss_scaling`
    (float16) wraps it in Keras' dynamic loss scaling. With `variables`, it is built for them now
    (else a step's first call would trace twice). Create it in the strategy's scope.
    """
    decay = "linear" if schedule == "warmup_linear" else "cosine"
    rate = WarmupDecay(learning_rate, warmup_steps, total_steps, decay)
    if optimizer == "sgd":
        made = keras.optimizers.SGD(rate, momentum=momentum)
    else:
        made = keras.optimizers.AdamW(rate, weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2)
        made.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    if loss_scaling:
        made = keras.optimizers.LossScaleOptimizer(made)
    if variables is not None:
        made.build(variables)
    return made


def set_mixed_precision(name):
    """Keras' global policy "mixed_<name>" (bfloat16, float16) for the models built next; None: as it is."""
    if name:
        keras.config.set_dtype_policy(f"mixed_{name}")
