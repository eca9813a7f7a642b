"""keras_mixer.JaxTrainStep: the JAX backend's device-resident step.

The step needs Keras on JAX, and this suite runs on TensorFlow, so one JAX-backend process runs
every check (SCRIPT) and prints what it saw; the tests assert on it.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_mixer
from runs import ROOT

SCRIPT = """
import json
import jax, jax.numpy as jnp, keras, numpy as np
import keras_mixer

TINY = dict(patch_size=4, hidden_dim=24, num_blocks=2, tokens_mlp_dim=12, channels_mlp_dim=48)

def model(**kwargs):
    net = keras_mixer.MlpMixer(**TINY, input_shape=(16, 16, 3), classes=7, classifier_activation=None, **kwargs)
    rng = np.random.default_rng(0)
    net.set_weights([rng.normal(0, 0.2, w.shape).astype(w.dtype) for w in net.get_weights()])
    return net

def adamw(**kwargs):
    optimizer = keras.optimizers.AdamW(3e-3, weight_decay=0.1, **kwargs)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer

def largest_difference(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a.get_weights(), b.get_weights()))

rng = np.random.default_rng(1)
images = rng.uniform(0, 255, (3, 8, 16, 16, 3)).astype("float32")  # 3 batches of 8
labels = rng.integers(0, 7, (3, 8))
seen = {}

# 1. Three clipped steps against Keras' own train_on_batch (global_clipnorm is the same rule).
reference = model()
reference.compile(adamw(global_clipnorm=0.5), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
for x, y in zip(images, labels):
    reference.train_on_batch(x, y)
net = model()
step = keras_mixer.JaxTrainStep(net, adamw(), clip_norm=0.5)
state = step.initial_state()
seen["norms"] = []
for x, y in zip(images, labels):
    state, metrics = step(state, jnp.asarray(x), jnp.asarray(y))
    seen["norms"].append(float(metrics["gradient_norm"]))
seen["untouched"] = largest_difference(model(), net)
step.write_back(state)
seen["moved"] = largest_difference(model(), net)
seen["difference"] = largest_difference(reference, net)
seen["iterations"] = int(step.optimizer.iterations.numpy())

# 2. Class ids and one-hot rows give the same loss, the float64 softmax cross-entropy; the state
#    given to a step is donated (its buffers are reused).
net = model()
step = keras_mixer.JaxTrainStep(net, adamw(), clip_norm=None)
first = step.initial_state()
leaf = first.trainable[0]
_, hard = step(first, jnp.asarray(images[0]), jnp.asarray(labels[0]))
_, soft = step(step.initial_state(), jnp.asarray(images[0]), jax.nn.one_hot(labels[0], 7))
logits = np.asarray(net(images[0]), "float64")
log_p = logits - logits.max(1, keepdims=True)
log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
seen.update(hard=float(hard["loss"]), soft=float(soft["loss"]), donated=leaf.is_deleted(),
            expected=float(-log_p[np.arange(8), labels[0]].mean()))

# 3. recompute: the same steps, and less kept for the backward pass (the bytes of the arrays the
#    VJP closes over). On this CPU the default (None) is off.
seen["default_on_cpu"] = keras_mixer.model.layers.recomputing(None)
trained, kept = {}, {}
for recompute in (False, True):
    net = model(recompute=recompute)
    step = keras_mixer.JaxTrainStep(net, adamw())
    state = step.initial_state()
    for x, y in zip(images, labels):
        state, _ = step(state, jnp.asarray(x), jnp.asarray(y))
    step.write_back(state)
    trained[recompute] = net
    weights = [v.value for v in net.trainable_variables]
    _, backward = jax.vjp(lambda w: net.stateless_call(w, [], jnp.asarray(images[0]), training=True)[0], weights)
    kept[recompute] = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(backward))
seen.update(recompute_difference=largest_difference(trained[False], trained[True]),
            kept_bytes=kept[False], kept_bytes_recomputing=kept[True])
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def seen():
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_step_updates_the_weights_as_train_on_batch_does(seen):
    # Clipping at 0.5 acted on every step (the norms are above it), so a step that skipped or
    # misplaced it would drift from the reference.
    assert min(seen["norms"]) > 0.5
    assert seen["difference"] < 1e-5
    assert seen["iterations"] == 3
    assert seen["untouched"] == 0  # the Keras variables change only at write_back
    assert seen["moved"] > 1e-3


@pytest.mark.slow  # the module's JAX process takes about 40 s
def test_class_ids_and_one_hot_labels_give_the_cross_entropy_and_the_state_is_donated(seen):
    assert seen["hard"] == pytest.approx(seen["expected"], rel=1e-5)
    assert seen["soft"] == pytest.approx(seen["expected"], rel=1e-5)
    assert seen["donated"]


@pytest.mark.slow  # the module's JAX process takes about 40 s
def test_recomputing_the_gelu_changes_no_weight_and_keeps_less_for_the_backward_pass(seen):
    assert seen["default_on_cpu"] is False
    assert seen["recompute_difference"] < 1e-6  # three AdamW steps, every weight
    # Each of the 4 MLPs (2 blocks x token, channel) keeps the GELU's input and output either way;
    # recomputing must drop at least two more of its hidden-width float32 tensors (batch 8).
    hidden_elements = 8 * (24 * 12 + 16 * 48)  # token MLP [B, C, D_S] + channel MLP [B, S, D_C], per block
    assert seen["kept_bytes"] - seen["kept_bytes_recomputing"] >= 2 * 2 * hidden_elements * 4


@pytest.mark.parametrize(
    "optimizer, clip_norm, error, pattern",
    [
        (dict(), 1.0, RuntimeError, r"runs Keras on 'tensorflow': set KERAS_BACKEND=jax"),
        (dict(), 0.0, ValueError, r"clip_norm must be a positive number or None, got 0.0"),
        (dict(global_clipnorm=1.0), 1.0, ValueError, r"optimizer clips too \(global_clipnorm=1.0\).*clip_norm=None"),
        ("loss_scale", 1.0, ValueError, r"does not scale the loss"),
    ],
)
def test_the_step_refuses_what_it_cannot_do_in_one_line(optimizer, clip_norm, error, pattern):
    import keras

    import keras_mixer

    if optimizer == "loss_scale":
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.AdamW())
    else:
        optimizer = keras.optimizers.AdamW(**optimizer)
    with pytest.raises(error, match=pattern):
        keras_mixer.JaxTrainStep(tiny_mixer(), optimizer, clip_norm=clip_norm)
