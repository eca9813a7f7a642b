"""Writes this folder's files with keras_mixer version 0.2 (commit d20f9e4), so that the tests can
show the files that version wrote keep loading: `python tests/data/v0_2/make.py` from the checkout
of that commit writes tiny.keras and tiny_outputs.npz. export/4 and export_metrics.json are the
export and metrics.json of `python trainers/pretrain.py --workdir RUN --steps 4 --checkpoint_every 2`
on that commit; workdir_at_step_2 is a workdir of the same command with --steps 4: its run.json and
its step-2 checkpoint (as if stopped there), and workdir_final_weights.npz the weights
(`model.get_weights()`) its uninterrupted run finished with. jax_workdir_at_step_2 and
jax_workdir_final_weights.npz are the same on Keras' JAX backend (KERAS_BACKEND=jax, an orbax
step folder), written at commit 645a066, the last before the training code was redesigned. Kept
for the record; the files are committed and never rewritten."""

import os

import numpy as np

import keras_mixer
from keras_mixer.weights import save_keras

HERE = os.path.dirname(os.path.abspath(__file__))

model = keras_mixer.MlpMixer(
    patch_size=4,
    hidden_dim=24,
    num_blocks=2,
    tokens_mlp_dim=12,
    channels_mlp_dim=48,
    input_shape=(16, 16, 3),
    classes=3,
    classifier_activation=None,
    name="v0_2_tiny",
)
rng = np.random.default_rng(2)
model.set_weights([rng.normal(0, 0.2, w.shape).astype(w.dtype) for w in model.get_weights()])
images = rng.uniform(0, 255, (2, 16, 16, 3)).astype("float32")
record = dict(
    dataset="digits",
    class_names=["zero", "one", "two"],
    model="T/4",
    image_size=[16, 16],
    step=7,
    eval_resize="resize",
    crop_ratio=0.875,
)
save_keras(model, os.path.join(HERE, "tiny.keras"), metadata=record)
np.savez(os.path.join(HERE, "tiny_outputs.npz"), images=images, logits=model.predict(images, verbose=0))
