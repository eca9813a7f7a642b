"""A/B of LayerNorm speed levers: Keras' LayerNormalization against a two-pass float32 LayerNorm,
and, on a CPU, the token MLP's LayerNorm as one FusedBatchNorm against the two-pass form.

    python benchmarks/layernorm_ab.py --formula keras|twopass --backend jax|tensorflow --mode gradient
    python benchmarks/layernorm_ab.py --formula keras|twopass --mode step        # JAX backend, on a GPU
    python benchmarks/layernorm_ab.py --formula fused|twopass --mode frozen --model S/16   # TF, a CPU

Run each formula in its own process, alternating, and compare the printed images/s.

    gradient  S/16, float32, batch 8: the gradient of softmax cross-entropy with respect to the
              trainable weights, compiled with XLA (jax.jit / tf.function(jit_compile=True)).
    step      B/16, mixed_bfloat16: jitted inference at batch 256 and `keras_mixer.JaxTrainStep`
              (AdamW, clipping at 1) at batch 128.
    frozen    `keras_mixer.freeze(model, "bfloat16")` (the export's graph), random weights, batch
              16, 5 calls after 2: "fused" is the library as it is (`fused_ops.token_major_layer_norm`),
              "twopass" gives the token MLP the LayerNorm every other norm uses.

The two-pass formula computes mean, then the variance of the centred values, in float32, and
casts the result to the compute dtype. It replaces Keras' layer in every block and before the head,
keeping its variables, so weights and outputs are those of the same model.
"""

import argparse
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
from compare import ROOT, _timed, worker_jax  # this folder is on sys.path when run as a script


def use_two_pass_layernorm():
    from keras import ops

    from keras_mixer.model.layers import LayerNorm

    def call(self, x, training=None):
        x32 = ops.cast(x, "float32")
        centred = x32 - ops.mean(x32, axis=-1, keepdims=True)
        variance = ops.mean(ops.square(centred), axis=-1, keepdims=True)
        y = centred * (ops.rsqrt(variance + self.epsilon) * self.gamma) + self.beta
        return ops.cast(y, self.compute_dtype)

    # Every LayerNorm of keras_mixer (each block's two and the pre-head one) is this class.
    LayerNorm.call = call


def seconds_per_call(call, sync, warmup, steps):
    """The median of `steps` timed calls after `warmup` untimed ones (compare.py's timing)."""
    return float(np.median(_timed(call, sync, warmup, steps)))


def gradient(backend, batch=8):
    from keras_mixer.model.mixer import MlpMixer

    net = MlpMixer(
        16, 512, 8, 256, 2048, input_shape=(224, 224, 3), classifier_activation=None, include_preprocessing=False
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, 224, 224, 3)).astype("float32")
    labels = rng.integers(0, 1000, batch)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        weights = [v.value for v in net.trainable_variables]
        x, y = jnp.asarray(images), jnp.asarray(labels)

        def loss(weights):
            logits = net.stateless_call(weights, [], x, training=True)[0]
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()

        grad = jax.jit(jax.grad(loss))
        return batch / seconds_per_call(lambda: grad(weights), jax.block_until_ready, 2, 4)
    import tensorflow as tf

    x, y = tf.constant(images), tf.constant(labels)

    @tf.function(jit_compile=True)
    def tf_grad():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, net(x, training=True)))
        return tape.gradient(loss, net.trainable_variables)

    from keras_mixer.model import fused_ops

    with fused_ops.plain_ops():  # traced as the trainers trace a step XLA compiles whole: Keras' own ops
        tf_grad()
    return batch / seconds_per_call(tf_grad, lambda out: out[0].numpy(), 2, 4)


def frozen(variant, batch=16):
    import keras_mixer
    from keras_mixer.model.mixer import MlpMixer, variant_config

    net = MlpMixer(**variant_config(variant), input_shape=(224, 224, 3), classifier_activation=None)
    rng = np.random.default_rng(0)
    net.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in net.get_weights()])
    fast = keras_mixer.freeze(net, "bfloat16")
    images = rng.uniform(0, 255, (batch, 224, 224, 3)).astype("float32")
    return batch / seconds_per_call(lambda: fast(images), lambda out: out.numpy(), 2, 5)


def step():
    """compare.py's own `keras_mixer jax jit` and `keras_mixer jax step` measurements, B/16 in
    bfloat16; returns (inference, training) images/s."""
    options = SimpleNamespace(image_size=224, dtype="bfloat16", warmup=3, steps=20, expand_from=0)
    inference = float(np.median(worker_jax("keras_mixer jax jit", "B/16", 256, options)))
    training = float(np.median(worker_jax("keras_mixer jax step", "B/16", 128, options)))
    return 256 / inference, 128 / training


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formula", choices=["keras", "twopass", "fused"], required=True)
    parser.add_argument("--backend", choices=["jax", "tensorflow"], default="jax")
    parser.add_argument("--mode", choices=["gradient", "step", "frozen"], default="gradient")
    parser.add_argument("--model", default="S/16", help="--mode frozen: the variant")
    args = parser.parse_args()
    if args.mode == "step" and args.backend != "jax":
        parser.error("--mode step measures keras_mixer.JaxTrainStep: it needs --backend jax")
    if args.mode == "frozen" and args.formula == "keras" or args.mode != "frozen" and args.formula == "fused":
        parser.error("--mode frozen compares --formula fused and twopass; the other modes keras and twopass")
    if args.mode == "frozen":
        args.backend = "tensorflow"
    os.environ["KERAS_BACKEND"] = args.backend
    sys.path.insert(0, ROOT)
    if args.mode == "frozen":
        if args.formula == "twopass":
            from keras_mixer.model import fused_ops

            fused_ops.token_major_norm = lambda training, dtype: False
        result = dict(model=args.model, images_per_second=frozen(args.model))
    else:
        if args.formula == "twopass":
            use_two_pass_layernorm()
        if args.mode == "gradient":
            result = dict(gradient=gradient(args.backend))
        else:
            inference, training = step()
            result = dict(inference=inference, training=training)
    print(json.dumps(dict(formula=args.formula, backend=args.backend, mode=args.mode, **result)))


if __name__ == "__main__":
    main()
