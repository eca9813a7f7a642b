"""The JAX backend's evaluator scores a model as the TF trainers' evaluator does.

The same weights are scored here (Keras on TensorFlow, `make_evaluator`) and in a JAX-backend
process over two CPU devices (`make_jax_evaluator` with `data_parallel`), on the digits test split.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY, randomize
from runs import ROOT

from keras_mixer import data
from keras_mixer.model.mixer import MlpMixer
from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.training.fewshot import extract_features, features_function, fit_probe
from keras_mixer.training.tf.evaluation import make_evaluator

SCRIPT = """
import json, sys
import numpy as np
from keras_mixer import data
from keras_mixer.training.jax.step import data_parallel
from keras_mixer.model.mixer import MlpMixer
from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.training.jax.evaluation import make_jax_evaluator

place = data_parallel()
config, weights = json.loads(sys.argv[1]), np.load(sys.argv[2])
model = MlpMixer(**config)
model.set_weights([weights[f"arr_{i}"] for i in range(len(weights.files))])
source = data.load_source("digits", "test")
evaluate = make_jax_evaluator(model, source, 64, 8, EvalPreprocessing("resize"), place)
values = lambda variables: [v.value for v in variables]
top1, top5 = evaluate(values(model.trainable_variables), values(model.non_trainable_variables))
print(json.dumps(dict(top1=top1, top5=top5)))
"""


@pytest.mark.slow  # a JAX process, about 20 s
def test_the_jax_evaluator_over_two_devices_scores_as_the_tf_evaluator(tmp_path):
    pytest.importorskip("jax")
    config = dict(**TINY, input_shape=(8, 8, 3), classes=10, classifier_activation=None)
    config["patch_size"] = 2
    model = randomize(MlpMixer(**config), seed=3)
    # A head that separates the classes (a least-squares probe on the random features), so the
    # two evaluators must agree image by image on many different predictions, not on one class.
    train = data.load_source("digits", "train")
    features, labels = extract_features(features_function(model), train, 8, EvalPreprocessing("resize"), verbose=0)
    model.get_layer("head").set_weights([w.astype("float32") for w in fit_probe(features, labels, 10)])
    weights = str(tmp_path / "weights.npz")
    np.savez(weights, *model.get_weights())
    source = data.load_source("digits", "test")
    expected = make_evaluator(
        tf.distribute.get_strategy(), lambda x: model(x, training=False), source, 64, 8, EvalPreprocessing("resize")
    )()
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": ROOT,
    }
    command = [sys.executable, "-c", SCRIPT, json.dumps(config), weights]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0.3 < expected[0] < 1 and expected[1] > expected[0]  # far above chance (0.1), not perfect
    # Counts of 360 test images; one image apart at most, for a logit tie that float rounding breaks
    # differently on the two backends.
    assert abs(seen["top1"] - expected[0]) <= 1 / 360 + 1e-9
    assert abs(seen["top5"] - expected[1]) <= 1 / 360 + 1e-9
