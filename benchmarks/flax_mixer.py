"""A Flax (linen) Mixer with the official parameter tree: the Flax peer of the parity tests and of
compare.py.

Its auto-named modules give exactly the published keys: `stem`, `MixerBlock_{i}/LayerNorm_0`,
`MixerBlock_{i}/token_mixing/Dense_0`, ..., `pre_head_layer_norm`, `head`. LayerNorm epsilon is
Flax's default 1e-6 and `nn.gelu` is the tanh approximation, as in the official code.
"""

import flax.linen as nn
import jax.numpy as jnp


class FlaxMlp(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        hidden = nn.gelu(nn.Dense(self.hidden)(x))  # created first, so auto-named Dense_0
        return nn.Dense(x.shape[-1])(hidden)


class FlaxMixerBlock(nn.Module):
    tokens_hidden: int
    channels_hidden: int

    @nn.compact
    def __call__(self, x):  # [B, S, C]
        y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)
        x = x + jnp.swapaxes(FlaxMlp(self.tokens_hidden, name="token_mixing")(y), 1, 2)
        return x + FlaxMlp(self.channels_hidden, name="channel_mixing")(nn.LayerNorm()(x))


class FlaxMixer(nn.Module):
    patch: int
    width: int
    blocks: int
    tokens_hidden: int
    channels_hidden: int
    classes: int

    @nn.compact
    def __call__(self, images):  # [B, H, W, 3] in [-1, 1]
        x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch), name="stem")(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        for i in range(self.blocks):
            x = FlaxMixerBlock(self.tokens_hidden, self.channels_hidden, name=f"MixerBlock_{i}")(x)
        x = nn.LayerNorm(name="pre_head_layer_norm")(x).mean(axis=1)
        return nn.Dense(self.classes, kernel_init=nn.initializers.zeros, name="head")(x)
