"""Learning-rate schedules of the paper's recipes, as serialisable Keras schedules.

Pre-training: linear warmup, then linear decay to 0. Fine-tuning: linear warmup, then cosine decay
to 0. `step` counts optimizer updates from 0.
"""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mixer")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = peak * step / warmup for step < warmup, then decays to 0 at `total_steps`:
    linearly ("linear") or along half a cosine ("cosine"). Constant 0 after `total_steps`."""

    def __init__(self, peak, warmup_steps, total_steps, decay="linear"):
        if decay not in ("linear", "cosine"):
            raise ValueError(f"decay must be 'linear' or 'cosine', got {decay!r}")
        if total_steps <= 0 or warmup_steps < 0:
            raise ValueError(f"need total_steps > 0 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
        self.peak, self.decay = float(peak), decay
        self.total_steps = int(total_steps)
        # Short runs (tests, demos) keep a warmup shorter than the run.
        self.warmup_steps = int(min(warmup_steps, max(total_steps - 1, 0)))

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = self.peak * step / max(self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0.0, 1.0)
        if self.decay == "linear":
            decayed = self.peak * (1.0 - progress)
        else:
            decayed = self.peak * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, warmup, decayed)

    def get_config(self):
        return dict(peak=self.peak, warmup_steps=self.warmup_steps, total_steps=self.total_steps, decay=self.decay)
