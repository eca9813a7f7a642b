"""Two bf16 inference levers on a CPU, each against the library as it is (TF backend).

    python benchmarks/bf16_levers.py --lever none|pure_policy|bf16_statistics --call frozen|predict

    none             the library: `keras_mixer.freeze(model, "bfloat16")` (the export's graph, the
                     mixed_bfloat16 policy) or `predict_on_batch` under mixed_bfloat16
    pure_policy      the pure `bfloat16` policy instead (head and pre-head LayerNorm in bf16 too;
                     with `predict`, variables in bf16, so no cast of the weights per call)
    bf16_statistics  LayerNorm's mean and variance computed in bf16 instead of float32

S/16 at 224², random weights, batch 16; prints one JSON line: images/s (median of 5 rounds of 3
calls after 2) and the largest difference from the float32 model's logits. Run the levers in
alternating processes and compare. Accuracy on trained models: `precision_agreement.py`.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bf16_statistics():
    """Makes inference LayerNorms on bf16 inputs compute their statistics in bf16."""
    import tensorflow as tf

    from keras_mixer.model import fused_ops

    library = fused_ops.layer_norm

    def layer_norm(x, gamma, beta, epsilon, training=None):
        if training or x.dtype != tf.bfloat16:
            return library(x, gamma, beta, epsilon, training)
        centered = x - tf.reduce_mean(x, -1, keepdims=True)
        inverse = tf.math.rsqrt(tf.reduce_mean(tf.square(centered), -1, keepdims=True) + epsilon)
        return centered * inverse * tf.cast(gamma, x.dtype) + tf.cast(beta, x.dtype)

    fused_ops.layer_norm = layer_norm


def measure(lever, call, batch=16):
    import keras
    import tensorflow as tf

    import keras_mixer
    from keras_mixer.model import precisions
    from keras_mixer.model.mixer import MlpMixer, variant_config

    policy = "bfloat16" if lever == "pure_policy" else "mixed_bfloat16"
    precisions.SERVING["bfloat16"] = policy  # what freeze() reads
    if lever == "bf16_statistics":
        bf16_statistics()
    rng = np.random.default_rng(0)
    net = MlpMixer(**variant_config("S/16"), input_shape=(224, 224, 3), classifier_activation=None)
    net.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in net.get_weights()])
    images = rng.uniform(0, 255, (batch, 224, 224, 3)).astype("float32")
    reference = net(images).numpy()
    if call == "predict":
        keras.config.set_dtype_policy(policy)
        model = MlpMixer.from_config(net.get_config())
        model.set_weights(net.get_weights())
        run = lambda: np.asarray(model.predict_on_batch(images), np.float32)  # noqa: E731
    else:
        frozen, tensor = keras_mixer.freeze(net, "bfloat16"), tf.constant(images)
        run = lambda: frozen(tensor).numpy()  # noqa: E731
    logits = run()
    run()
    rates = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(3):
            run()
        rates.append(3 * batch / (time.perf_counter() - started))
    return dict(images_per_second=float(np.median(rates)), max_logit_difference=float(np.abs(logits - reference).max()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lever", choices=["none", "pure_policy", "bf16_statistics"], required=True)
    parser.add_argument("--call", choices=["frozen", "predict"], default="frozen")
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = "tensorflow"
    sys.path.insert(0, ROOT)
    print(json.dumps(dict(lever=args.lever, call=args.call, **measure(args.lever, args.call))))


if __name__ == "__main__":
    main()
