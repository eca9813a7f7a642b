"""Trains a small Mixer on scikit-learn's handwritten digits (real data, no download) and evaluates it.

    python examples/train_digits.py

1,797 real 8x8 digit images (values 0..16), a fixed 80/20 split. The model is a 4-block Mixer with
2x2 patches (16 tokens). Until the trainers land this is the project's main job.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_mixer  # noqa: E402


def main(epochs=40, seed=0):
    keras.utils.set_random_seed(seed)
    digits = load_digits()
    # Digit intensities 0..16 -> pixels 0..255, grey -> 3 channels, as an RGB image pipeline gives.
    images = np.repeat(digits.images[..., None] * (255.0 / 16.0), 3, axis=-1).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    model = keras_mixer.MlpMixer(
        patch_size=2,
        hidden_dim=64,
        num_blocks=4,
        tokens_mlp_dim=32,
        channels_mlp_dim=256,
        input_shape=(8, 8, 3),
        classes=10,
        classifier_activation=None,
        drop_path_rate=0.1,
        name="mixer_digits",
    )
    steps = epochs * int(np.ceil(len(x_train) / 64))
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, warmup_target=3e-3, warmup_steps=steps // 10)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=True,  # Keras' "auto" turns XLA off on CPU; it is faster here.
    )
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=2)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {accuracy:.4f} on {len(x_test)} held-out digits")
    return accuracy


if __name__ == "__main__":
    main()
