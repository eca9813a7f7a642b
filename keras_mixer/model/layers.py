"""The Mixer's own Keras layers.

Shapes use B batch, H x W image, P patch, S = HW / P^2 tokens, C channels (hidden width).
The arithmetic of the products, GELU and LayerNorm goes through `keras_mixer.model.fused_ops`: `keras.ops`
on every backend, in forms TF's CPU kernels fuse on TensorFlow. So every layer runs on any backend.

Sub-layer names follow the official Flax parameter tree, so a variable's Keras path reads like the
official weights-file key: `MixerBlock_3/token_mixing/Dense_0/kernel`.
"""

import keras
from keras import layers, ops

from keras_mixer.argument_checks import (
    check_gelu,
    check_image_size,
    check_positive_int,
    check_rate,
    check_recompute,
    to_pair,
)
from keras_mixer.model import fused_ops

_REGISTER = keras.saving.register_keras_serializable(package="keras_mixer")


def recomputing(recompute):
    """Whether the MLPs recompute their GELU in the backward pass (the `recompute` argument).

    Recomputing keeps only the GELU's input for the gradient instead of its intermediates as well
    (on the JAX backend the tanh form keeps four more tensors of the MLP's hidden width), for a few
    elementwise ops more in the backward pass. On an H100 that cut B/16's training memory by 23 %
    at the same speed. `None` decides per run: on with Keras' JAX backend on a GPU, off otherwise
    (CPUs, TPUs and the TF backend), where it was not measured to help.
    Outputs and gradients are the same either way; only what the backward pass keeps differs.
    """
    if recompute is not None:
        return recompute
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "gpu"


def policy_of(dtype):
    """A layer's `dtype` argument as a policy: None stays None (the global policy); a
    `DTypePolicyMap` is copied with each entry made a policy (Keras' map keeps names as given,
    which its layers cannot read), so quantizing the model never changes the caller's map."""
    if dtype is None:
        return None
    if isinstance(dtype, keras.dtype_policies.DTypePolicyMap):
        entries = {path: keras.dtype_policies.get(dtype[path]) for path in dtype}
        return keras.dtype_policies.DTypePolicyMap(dtype.default_policy, entries)
    return keras.dtype_policies.get(dtype)


def float32_if_mixed(policy):
    """The dtype for the numerically sensitive end of the model (pre-head LayerNorm, pooling, head).

    Under a mixed policy (`mixed_bfloat16`, `mixed_float16`) they run in float32, as is usual for
    logits; otherwise they follow `policy`. A `DTypePolicyMap` keeps its per-layer entries (a
    quantized head stays quantized) over a float32 default where its own default is mixed.
    """
    policy = keras.dtype_policies.get(policy) if policy is not None else keras.config.dtype_policy()
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        default = policy.default_policy
        if default.compute_dtype == default.variable_dtype:
            return policy
        return keras.dtype_policies.DTypePolicyMap("float32", {path: policy[path] for path in policy})
    if policy.compute_dtype != policy.variable_dtype:
        return "float32"
    return policy


@_REGISTER
class LayerNorm(layers.LayerNormalization):
    """Keras' LayerNormalization over the last axis, computed by `fused_ops.layer_norm` (float32
    statistics; fused XLA passes or lean TF ops on TensorFlow). Variables `gamma`, `beta` [D].
    Input and output: [..., D]."""

    def call(self, inputs, training=None):
        return ops.cast(fused_ops.layer_norm(inputs, self.gamma, self.beta, self.epsilon, training), self.compute_dtype)


@_REGISTER
class PatchStem(layers.Layer):
    """Cuts the image into non-overlapping P x P patches and projects each to C channels.

    A convolution with kernel = stride = patch, then the (H/P, W/P) grid flattened row-major into
    tokens, exactly as the official `n h w c -> n (h w) c`.

    Input: [B, H, W, channels] with H and W multiples of the patch. Output: [B, S, C].
    The variables are `kernel` [Ph, Pw, channels, C] (HWIO, as Flax) and `bias` [C].
    """

    def __init__(self, hidden_dim, patch_size, kernel_initializer="lecun_normal", **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.patch_size = to_pair("patch_size", patch_size)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"{self.name} expects images [batch, height, width, channels], got shape {input_shape}")
        _, height, width, channels = input_shape
        check_image_size((height, width), self.patch_size)
        if channels is None or channels <= 0:
            raise ValueError(f"{self.name} needs a known positive channel count, got shape {input_shape}")
        self.grid_size = (height // self.patch_size[0], width // self.patch_size[1])
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.patch_size, channels, self.hidden_dim),
            initializer=self.kernel_initializer,
        )
        self.bias = self.add_weight(name="bias", shape=(self.hidden_dim,), initializer="zeros")
        # A wrong channel count in a later call fails here, naming the expected and received value.
        self.input_spec = layers.InputSpec(ndim=4, axes={1: height, 2: width, 3: channels})

    def call(self, images):
        patches = ops.conv(images, self.kernel, strides=self.patch_size, padding="valid")
        patches = patches + self.bias
        batch = ops.shape(patches)[0]
        return ops.reshape(patches, (batch, self.grid_size[0] * self.grid_size[1], self.hidden_dim))

    def compute_output_shape(self, input_shape):
        _, height, width, _ = input_shape
        return (input_shape[0], (height // self.patch_size[0]) * (width // self.patch_size[1]), self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            patch_size=self.patch_size,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@_REGISTER
class MlpBlock(layers.Layer):
    """Dense(hidden_dim) -> GELU -> Dense(back to the input width), dropout after each stage.

    Input: [..., D]. Output: [..., D]. Sub-layers `Dense_0` [D, hidden_dim] and `Dense_1`
    [hidden_dim, D], named as the official code names them.

    Args:
        hidden_dim: width of the hidden layer (D_S for token mixing, D_C for channel mixing).
        dropout_rate: dropout after the GELU and after `Dense_1` (0 in every paper recipe).
        gelu: "tanh" (the approximation the official Flax weights were trained with) or "exact"
            (the erf form timm uses).
        recompute: recompute the GELU in the backward pass from its input; None: see `recomputing`.
    """

    def __init__(
        self, hidden_dim, dropout_rate=0.0, gelu="tanh", kernel_initializer="lecun_normal", recompute=None, **kwargs
    ):
        super().__init__(**kwargs)
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.dropout_rate = check_rate("dropout_rate", dropout_rate)
        self.gelu = check_gelu(gelu)
        self.recompute = check_recompute(recompute)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.dense_0 = layers.Dense(
            self.hidden_dim, kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy, name="Dense_0"
        )
        self.dropout = layers.Dropout(self.dropout_rate, dtype=self.dtype_policy) if self.dropout_rate else None

    def build(self, input_shape):
        # The output width is the input width, known only now.
        self.dense_1 = layers.Dense(
            input_shape[-1], kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy, name="Dense_1"
        )
        self.dense_0.build(input_shape)
        self.dense_1.build((*input_shape[:-1], self.hidden_dim))
        if self.dropout is not None:
            self.dropout.build(input_shape)

    def call(self, inputs, training=None):
        hidden = self._hidden(inputs, training)
        if self.dropout is not None:
            hidden = self.dropout(hidden, training=training)
        if self.dense_1.quantization_mode:  # Keras' own quantized kernel
            outputs = self.dense_1(hidden)
        else:
            outputs = fused_ops.dense(hidden, self.dense_1.kernel, self.dense_1.bias, training=training)
        if self.dropout is not None:
            outputs = self.dropout(outputs, training=training)
        return outputs

    def _hidden(self, inputs, training):
        """GELU(Dense_0(inputs)): [..., D] -> [..., hidden_dim]. `kernel` includes a LoRA update
        where one is enabled, as Dense's own call does."""
        if self.dense_0.quantization_mode:
            return self._activation(self.dense_0(inputs), training)
        kernel, bias = self.dense_0.kernel, self.dense_0.bias
        if recomputing(self.recompute):
            # `training` stays out of the arguments: JAX would trace it as an array.
            return keras.remat(lambda hidden: self._activation(hidden, training))(fused_ops.dense(inputs, kernel, bias))
        # The product, its bias and the GELU in one call: on TF they fuse into one oneDNN kernel.
        return fused_ops.dense(inputs, kernel, bias, activation=self.gelu, training=training)

    def _activation(self, hidden, training=None):
        return fused_ops.gelu(hidden, approximate=self.gelu == "tanh", training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            dropout_rate=self.dropout_rate,
            gelu=self.gelu,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recompute=self.recompute,
        )
        return config


@_REGISTER
class DropPath(layers.Layer):
    """Stochastic depth: drops a whole residual branch for some samples of the batch.

    In training each sample keeps the branch with probability 1 - rate; kept branches are scaled by
    1 / (1 - rate) so the expected output equals the inference output (big_vision and timm do the
    same). At inference it is the identity.

    Input: [B, ...]. Output: same shape; one mask value per sample, shared by all its elements.
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = check_rate("drop_path_rate", rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate else None

    def call(self, inputs, training=None):
        if not training or not self.rate:
            return inputs
        keep = 1.0 - self.rate
        mask_shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        noise = keras.random.uniform(mask_shape, dtype="float32", seed=self.seed_generator)
        mask = ops.cast(noise < keep, inputs.dtype)
        return inputs * mask / ops.cast(keep, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config


@_REGISTER
class MixerBlock(layers.Layer):
    """One Mixer layer: token mixing, then channel mixing, each a pre-norm residual branch.

        x = x + DropPath(Permute(TokenMLP(Permute(LayerNorm_0(x)))))   # mixes across the S tokens
        x = x + DropPath(ChannelMLP(LayerNorm_1(x)))                    # mixes across the C channels

    Input and output: [B, S, C]. The token MLP's weights are [S, D_S] and [D_S, S], so a built block
    is tied to one token count S (one input size).

    Args:
        tokens_mlp_dim: D_S, hidden width of the token MLP.
        channels_mlp_dim: D_C, hidden width of the channel MLP.
        dropout_rate: dropout inside both MLPs.
        drop_path_rate: stochastic-depth drop probability of each residual branch of this block.
        gelu: "tanh" or "exact"; see `MlpBlock`.
        recompute: recompute the GELUs in the backward pass from their inputs; None: see
            `recomputing`.
    """

    def __init__(
        self,
        tokens_mlp_dim,
        channels_mlp_dim,
        dropout_rate=0.0,
        drop_path_rate=0.0,
        gelu="tanh",
        kernel_initializer="lecun_normal",
        seed=None,
        recompute=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.tokens_mlp_dim = check_positive_int("tokens_mlp_dim", tokens_mlp_dim)
        self.channels_mlp_dim = check_positive_int("channels_mlp_dim", channels_mlp_dim)
        self.dropout_rate = check_rate("dropout_rate", dropout_rate)
        self.drop_path_rate = check_rate("drop_path_rate", drop_path_rate)
        self.gelu = check_gelu(gelu)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.recompute = check_recompute(recompute)
        mlp_args = dict(
            dropout_rate=self.dropout_rate,
            gelu=self.gelu,
            kernel_initializer=self.kernel_initializer,
            recompute=self.recompute,
        )
        # The LayerNorms follow the block's policy: under mixed_bfloat16 they emit bfloat16, which
        # halves the bytes the transposes and elementwise ops move. Nothing is lost: the Keras op
        # computes statistics, scale and offset in float32 (LayerNormalization never autocasts its
        # variables), and the next Dense would round its input to bfloat16 anyway.
        self.layer_norm_0 = LayerNorm(epsilon=1e-6, dtype=self.dtype_policy, name="LayerNorm_0")
        self.token_mixing = MlpBlock(self.tokens_mlp_dim, dtype=self.dtype_policy, name="token_mixing", **mlp_args)
        self.layer_norm_1 = LayerNorm(epsilon=1e-6, dtype=self.dtype_policy, name="LayerNorm_1")
        self.channel_mixing = MlpBlock(
            self.channels_mlp_dim, dtype=self.dtype_policy, name="channel_mixing", **mlp_args
        )
        # [B, S, C] <-> [B, C, S]: the token MLP's Dense layers act on the last axis.
        self.transpose = layers.Permute((2, 1), dtype=self.dtype_policy, name="transpose")
        self.drop_path = DropPath(self.drop_path_rate, seed=seed, dtype=self.dtype_policy, name="drop_path")

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{self.name} expects tokens [batch, tokens, channels], got shape {input_shape}")
        batch, tokens, channels = input_shape
        self.layer_norm_0.build(input_shape)
        self.token_mixing.build((batch, channels, tokens))
        self.layer_norm_1.build(input_shape)
        self.channel_mixing.build(input_shape)
        # Every sub-layer is built here, as a functional model's layers are, so that the model can be
        # quantized (or its dtype policies mapped by layer path) straight after construction.
        self.transpose.build(input_shape)
        self.drop_path.build(input_shape)

    def call(self, tokens, training=None):
        # bf16 inference on a TF CPU: the token MLP runs on [C, B, S], after one fused LayerNorm.
        if fused_ops.token_major_norm(training, tokens.dtype):
            norm = self.layer_norm_0
            normed = fused_ops.token_major_layer_norm(tokens, norm.gamma, norm.beta, norm.epsilon)
            mixed = ops.transpose(self.token_mixing(normed, training=training), (1, 2, 0))
        else:
            mixed = self.transpose(self.token_mixing(self.transpose(self.layer_norm_0(tokens)), training=training))
        tokens = tokens + ops.cast(self.drop_path(mixed, training=training), tokens.dtype)
        mixed = self.channel_mixing(self.layer_norm_1(tokens), training=training)
        return tokens + ops.cast(self.drop_path(mixed, training=training), tokens.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            tokens_mlp_dim=self.tokens_mlp_dim,
            channels_mlp_dim=self.channels_mlp_dim,
            dropout_rate=self.dropout_rate,
            drop_path_rate=self.drop_path_rate,
            gelu=self.gelu,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            seed=self.seed,
            recompute=self.recompute,
        )
        return config
