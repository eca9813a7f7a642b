"""Data parallelism on Keras' JAX backend: one step over two devices is the step over one.

The suite runs Keras on TensorFlow, so each device count runs in its own JAX-backend process
(XLA_FLAGS must give the host's device count before JAX starts) and prints what it saw.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from runs import ROOT

SCRIPT = """
import json
import jax, keras, numpy as np
import keras_mixer
from keras_mixer.training.jax.step import JaxTrainStep, data_parallel

place = data_parallel()  # before the model: its variables get a replica on every device
TINY = dict(patch_size=4, hidden_dim=24, num_blocks=2, tokens_mlp_dim=12, channels_mlp_dim=48)
net = keras_mixer.MlpMixer(**TINY, input_shape=(16, 16, 3), classes=7, classifier_activation=None)
rng = np.random.default_rng(0)
net.set_weights([rng.normal(0, 0.2, w.shape).astype(w.dtype) for w in net.get_weights()])
optimizer = keras.optimizers.AdamW(3e-3, weight_decay=0.1)
step = JaxTrainStep(net, optimizer, clip_norm=0.5)
state = step.initial_state()
images = rng.uniform(0, 255, (4, 8, 16, 16, 3)).astype("float32")  # 4 global batches of 8
labels = rng.integers(0, 7, (4, 8))
seen = dict(devices=len(jax.devices()), losses=[], top1=[])
for x, y in zip(images, labels):
    x, y = place((x, y))
    seen["batch_devices"] = len(x.sharding.device_set)
    seen["rows_per_device"] = sorted({shard.data.shape[0] for shard in x.addressable_shards})
    state, metrics = step(state, x, y)
    seen["losses"].append(float(metrics["loss"]))
    seen["top1"].append(float(metrics["top1"]))
seen["weights_on"] = len(state.trainable[0].sharding.device_set)
step.write_back(state)
seen["weights"] = [w.tolist() for w in net.get_weights()[:4]]
print(json.dumps(seen))
"""


def _run(devices):
    pytest.importorskip("jax")
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": ROOT,
    }
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two JAX processes, about 30 s
def test_two_devices_take_the_same_steps_as_one():
    one, two = _run(1), _run(2)
    assert one["devices"] == 1 and two["devices"] == 2
    # Each batch of 8 is split 4 + 4 over both devices; the weights have a replica on each.
    assert two["batch_devices"] == 2 and two["rows_per_device"] == [4] and two["weights_on"] == 2
    assert one["rows_per_device"] == [8]
    # The same losses and weights after four clipped AdamW steps, to float32 rounding: two devices
    # sum the batch's losses and gradients in another order (relative error ~1e-7 per sum).
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    assert two["top1"] == one["top1"]
    for a, b in zip(one["weights"], two["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-5)
    assert one["losses"][-1] < one["losses"][0]  # the steps trained
