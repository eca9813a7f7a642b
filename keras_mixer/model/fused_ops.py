"""The Mixer's arithmetic per Keras backend: dense products, GELU and LayerNorm.

On every backend but TensorFlow these are the plain `keras.ops` forms, which XLA fuses itself.
On TensorFlow they are written for the CPU's oneDNN kernels, the only ones there that reach the
bf16 matrix units (AMX, AVX512-BF16): XLA's CPU backend does not use them. Measured on a 2-core
Xeon with AMX, S/16, batch 16, bf16 (`benchmarks/compare.py`, docs/speed.md):

- `dense` computes [..., D] @ [D, U] as one 2-D MatMul followed by `tf.nn.bias_add`. Only in that
  form does TF's graph optimizer fuse MatMul + BiasAdd + GELU into one oneDNN call; Keras' Dense
  on [B, S, C] lowers to Tensordot + AddV2, which it leaves unfused (inference 34 -> 65 img/s).
- In training, where TF runs op by op on a CPU, each elementwise op is a pass over memory, and
  autodiff of the GELU formula emits about 20 of them. There each product's bias and GELU, and
  `layer_norm`, run as small XLA-compiled functions, one for the forward and one for the backward
  pass (`tf.custom_gradient`): XLA fuses each into one loop while the matrix products stay with
  oneDNN (the trainers' step: 8.5 img/s with XLA, 13 without, 22.6 with these pieces).
- In bf16 inference the token MLP's LayerNorm is one FusedBatchNorm on the transposed tokens
  (`token_major_layer_norm`) instead of six elementwise ops: S/16 frozen 96 -> 110 img/s.
  Writing the token MLP without transposes ran slower (as batched products over the token axis:
  5.1 -> 8.5 ms a branch; with the whole stream channel-major [C, B*S]: the channel MLP's products
  stop fusing).
- Inference graphs (`training` false) never hold an XLA-compiled piece, so a SavedModel traced
  from the model runs in TF Serving, which compiles no XLA on CPUs unless told to, and converts to
  ONNX. Nor do graphs traced under `plain_ops()` (a step that XLA compiles whole fuses the plain
  ops itself) or on a GPU.

Shapes: `x` [..., D]; `kernel` [D, U]; `bias` [U]; LayerNorm `gamma`, `beta` [D].
"""

import contextlib
import functools
import math
import threading

import keras
from keras import ops

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_local = threading.local()


@contextlib.contextmanager
def plain_ops():
    """Within this block the kernels emit plain ops only, no XLA-compiled piece: for graphs TF
    Serving runs, and for training steps that XLA compiles whole."""
    before = getattr(_local, "plain", False)
    _local.plain = True
    try:
        yield
    finally:
        _local.plain = before


def _tensorflow():
    return keras.backend.backend() == "tensorflow"


@functools.cache
def _has_gpu():
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


def _tensorflow_on_cpu():
    """The TF backend, no GPU, outside a TPU strategy (which compiles everything with XLA)."""
    if not _tensorflow() or _has_gpu():
        return False
    import tensorflow as tf

    return not isinstance(tf.distribute.get_strategy(), tf.distribute.TPUStrategy)


def xla_pieces(training):
    """True where the elementwise work runs as XLA-compiled pieces: in training on the TF backend
    on a CPU, outside `plain_ops()`."""
    return bool(training) and not getattr(_local, "plain", False) and _tensorflow_on_cpu()


def token_major_norm(training, dtype):
    """Whether the token MLP's LayerNorm is `token_major_layer_norm`: in inference on the TF
    backend on a CPU (measured there only), for 16-bit activations. In float32 its batch norm
    loses digits on tokens whose mean is large against their spread (error 1.7e-5 against the
    two-pass form's 3.7e-6 at a mean of 30 standard deviations), which the weights' parity would
    feel; in bfloat16 the rounding of the activations is 100x larger than either."""
    sixteen_bits = keras.backend.standardize_dtype(dtype) in ("bfloat16", "float16")
    return sixteen_bits and not training and _tensorflow_on_cpu()


def dense(x, kernel, bias, activation=None, training=None):
    """activation(x @ kernel + bias): [..., D] -> [..., U]. `activation`: None, "tanh" or "exact"
    (the GELU forms)."""
    if not _tensorflow():
        y = ops.matmul(x, kernel) + bias
        return y if activation is None else keras.activations.gelu(y, approximate=activation == "tanh")
    import tensorflow as tf

    units = kernel.shape[-1]
    flat = len(x.shape) == 2
    outer = None if flat else tf.shape(x)[:-1]
    x = x if flat else tf.reshape(x, (-1, x.shape[-1]))
    y = tf.matmul(x, kernel)
    if xla_pieces(training):  # the plain product (AMX), then bias and GELU in one fused pass
        y = _bias_activation(y, tf.cast(bias, y.dtype), activation)
    else:
        y = tf.nn.bias_add(y, tf.cast(bias, y.dtype))
        if activation is not None:
            y = tf.nn.gelu(y, approximate=activation == "tanh")
    return y if flat else tf.reshape(y, tf.concat([outer, [units]], 0))


def gelu(x, approximate, training=None):
    """GELU, "tanh" approximation (`approximate=True`, the official weights') or the exact erf form."""
    if xla_pieces(training):
        import tensorflow as tf

        rows = tf.reshape(x, (-1, x.shape[-1]))
        y = _bias_activation(rows, tf.zeros(x.shape[-1:], x.dtype), "tanh" if approximate else "exact")
        return tf.reshape(y, tf.shape(x))
    return keras.activations.gelu(x, approximate=approximate)


def layer_norm(x, gamma, beta, epsilon, training=None):
    """LayerNorm over the last axis with float32 statistics; returns x's dtype. [..., D] -> [..., D].

    On TF: the XLA piece in training on a CPU; in inference a two-pass formula with two full-size
    passes fewer than Keras' (an unfused TF graph pays for each); Keras' own op in training that
    XLA compiles whole (its gradient compiles faster there: S/16 float32 step 10 vs 8 img/s)."""
    if not _tensorflow() or (training and not xla_pieces(training)):
        return ops.cast(ops.layer_normalization(x, gamma, beta, -1, epsilon), x.dtype)
    import tensorflow as tf

    gamma, beta = tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32)
    if xla_pieces(training):
        return _xla_layer_norm(x, gamma, beta, epsilon)
    x32 = tf.cast(x, tf.float32)
    centered = x32 - tf.reduce_mean(x32, -1, keepdims=True)
    inverse = tf.math.rsqrt(tf.reduce_mean(tf.square(centered), -1, keepdims=True) + epsilon)
    return tf.cast(centered * inverse * gamma + beta, x.dtype)


def token_major_layer_norm(x, gamma, beta, epsilon):
    """LayerNorm over the last axis of x [B, S, C], returned as [C, B, S], the token MLP's input
    (its Dense layers act on the last axis). TensorFlow only; see `token_major_norm`.

    One 2-D transpose and one FusedBatchNorm whose "channels" are the B*S tokens, so it computes
    each token's statistics over C in one oneDNN pass where LayerNorm's ops make six. The scale
    and offset follow per row of C."""
    import tensorflow as tf

    channels, tokens = x.shape[-1], x.shape[-2]
    columns = tf.transpose(tf.reshape(x, (-1, channels)))  # [C, B*S]
    count = tf.shape(columns)[1]
    ones, zeros = tf.ones([count]), tf.zeros([count])
    normed, *_ = tf.raw_ops.FusedBatchNormV3(
        x=tf.reshape(columns, (1, channels, 1, count)),
        scale=ones,
        offset=zeros,
        mean=zeros,
        variance=ones,
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=True,
    )
    normed = tf.reshape(normed, (channels, -1, tokens))
    return normed * tf.cast(gamma, x.dtype)[:, None, None] + tf.cast(beta, x.dtype)[:, None, None]


# --- the XLA-compiled pieces (TensorFlow only) ---------------------------------------------------


def _activation_and_slope(z, activation):
    """(GELU(z), its derivative) in float32; `activation` "tanh" or "exact", the GELU forms."""
    import tensorflow as tf

    if activation == "tanh":
        inner = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = tf.tanh(inner)
        slope = 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)
        return 0.5 * z * (1 + t), slope
    cdf = 0.5 * (1 + tf.math.erf(z * (1 / math.sqrt(2.0))))
    return z * cdf, cdf + z * tf.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))


@functools.cache
def _compiled_bias_activation(activation):
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def forward(x, bias):
        z = tf.cast(x, tf.float32) + tf.cast(bias, tf.float32)
        return tf.cast(_activation_and_slope(z, activation)[0], x.dtype)

    @tf.function(jit_compile=True)
    def backward(x, bias, upstream):
        # The slope is evaluated again from x, in float32. Kept from the forward pass in bf16 it
        # made the S/16 step 10 % faster but cost the bf16 demo 0.55 points of top-1; kept in
        # float32 it was slower than evaluating it again.
        z = tf.cast(x, tf.float32) + tf.cast(bias, tf.float32)
        dz = tf.cast(upstream, tf.float32) * _activation_and_slope(z, activation)[1]
        return tf.cast(dz, x.dtype), tf.cast(tf.reduce_sum(dz, 0), bias.dtype)

    return forward, backward


def _bias_activation(x, bias, activation):
    """activation(x + bias) with its gradient, each pass one XLA function. x [N, U], bias [U];
    `activation` None, "tanh" or "exact"."""
    import tensorflow as tf

    if activation is None:  # no slope to evaluate
        return _bias_add(x, bias)
    forward, backward = _compiled_bias_activation(activation)

    @tf.custom_gradient
    def bias_activation(x, bias):
        return forward(x, bias), lambda upstream: backward(x, bias, upstream)

    return bias_activation(x, bias)


@functools.cache
def _compiled_bias_add():
    import tensorflow as tf

    # An XLA piece even forward: TF's optimizer would fuse a plain Add into the product, which
    # with variable weights runs oneDNN's generic GEMM instead of the AMX one.
    add = tf.function(lambda x, bias: x + bias, jit_compile=True)
    column_sum = tf.function(lambda upstream: tf.reduce_sum(tf.cast(upstream, tf.float32), 0), jit_compile=True)
    return add, column_sum


def _bias_add(x, bias):
    """x [N, U] + bias [U], each pass one XLA function (the backward one sums the bias's columns)."""
    import tensorflow as tf

    add, column_sum = _compiled_bias_add()

    @tf.custom_gradient
    def bias_add(x, bias):
        return add(x, bias), lambda upstream: (upstream, tf.cast(column_sum(upstream), bias.dtype))

    return bias_add(x, bias)


@functools.cache
def _compiled_layer_norm():
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def forward(x, gamma, beta, epsilon):
        """x [N, D] -> (y [N, D], mean [N, 1], inverse standard deviation [N, 1])."""
        x32 = tf.cast(x, tf.float32)
        mean = tf.reduce_mean(x32, -1, keepdims=True)
        centered = x32 - mean
        inverse = tf.math.rsqrt(tf.reduce_mean(centered * centered, -1, keepdims=True) + epsilon)
        return tf.cast(centered * inverse * gamma + beta, x.dtype), mean, inverse

    @tf.function(jit_compile=True)
    def backward(x, gamma, mean, inverse, upstream):
        # The forward pass's statistics are kept, not recomputed: that halves this pass's time.
        x32, dy = tf.cast(x, tf.float32), tf.cast(upstream, tf.float32)
        normed = (x32 - mean) * inverse
        scaled = dy * gamma
        dx = inverse * (
            scaled
            - tf.reduce_mean(scaled, -1, keepdims=True)
            - normed * tf.reduce_mean(scaled * normed, -1, keepdims=True)
        )
        return tf.cast(dx, x.dtype), tf.reduce_sum(dy * normed, 0), tf.reduce_sum(dy, 0)

    return forward, backward


def _xla_layer_norm(x, gamma, beta, epsilon):
    """LayerNorm of x [..., D] with its gradient, each pass one XLA function on [rows, D]."""
    import tensorflow as tf

    forward, backward = _compiled_layer_norm()
    shape = tf.shape(x)

    @tf.custom_gradient
    def layer_norm(rows, gamma, beta):
        y, mean, inverse = forward(rows, gamma, beta, epsilon)
        return y, lambda upstream: backward(rows, gamma, mean, inverse, upstream)

    return tf.reshape(layer_norm(tf.reshape(x, (-1, x.shape[-1])), gamma, beta), shape)
