"""Moving a trained Mixer to a larger input: the block-diagonal token-MLP expansion (paper, App. C).

A Mixer trained on an (h, w) patch grid has token MLPs of shape [S, D_S] and [D_S, S], S = hw.
At an image Kh x Kw times larger per side the grid is (Kh h, Kw w): S' = Kh Kw S tokens. The new
token MLP is block-diagonal with Kh Kw copies of the trained one (width D_S' = Kh Kw D_S), so each
of the Kh x Kw sub-images is mixed exactly as the trained model mixed a whole image; channel
mixing, the stem, the norms and the head are shared unchanged.

Token order: the block structure assumes the tokens of one sub-image are contiguous, but the stem
flattens the big grid row-major, which interleaves the sub-images row by row. We permute the
*weights* (rows of Dense_0's kernel, columns of Dense_1's kernel, entries of Dense_1's bias) rather
than the tokens. The expanded model is then a plain Mixer: same layers, row-major token order at
its input and in its token outputs, no extra gather op, and it saves, loads, exports and trains
like any other Mixer of its size.
"""

import logging

import numpy as np

from keras_mixer.argument_checks import to_pair
from keras_mixer.weights_io.official_keys import assign, is_mixer, model_params

log = logging.getLogger("keras_mixer")


def expansion_factors(image_size, new_size):
    """(Kh, Kw) such that new_size = (Kh H, Kw W); ValueError listing the possible sizes otherwise."""
    (height, width), (new_height, new_width) = image_size, new_size
    if new_height % height or new_width % width or new_height < height or new_width < width:
        examples = ", ".join(f"{kh * height}x{kw * width}" for kh, kw in ((1, 2), (2, 1), (2, 2), (3, 3)))
        raise ValueError(
            f"Cannot expand a Mixer trained at {height}x{width} to {new_height}x{new_width}: each side must "
            f"be an integer multiple of the trained side (height k*{height}, width m*{width}, e.g. {examples})"
        )
    return new_height // height, new_width // width


def token_order(grid, factors):
    """For each row-major token t of the expanded grid, its index in the concatenation of the
    Kh*Kw sub-grids (sub-grids in row-major order, each flattened row-major).

    grid: the trained (h, w) patch grid; factors: (Kh, Kw). Returns int array [Kh h * Kw w].
    """
    (gh, gw), (kh, kw) = grid, factors
    rows = np.arange(gh * kh)[:, None]
    cols = np.arange(gw * kw)[None, :]
    sub_grid = (rows // gh) * kw + cols // gw
    local = (rows % gh) * gw + cols % gw
    return (sub_grid * gh * gw + local).reshape(-1)


def expand_token_mlp(dense_0, dense_1, grid, factors):
    """Block-diagonal expansion of one token MLP, permuted to row-major token order.

    Args:
        dense_0: (kernel [S, D_S], bias [D_S]); dense_1: (kernel [D_S, S], bias [S]).
    Returns:
        ((kernel [S', D_S'], bias [D_S']), (kernel [D_S', S'], bias [S'])), S' = K S, D_S' = K D_S,
        K = Kh Kw.
    """
    copies = factors[0] * factors[1]
    order = token_order(grid, factors)
    (k0, b0), (k1, b1) = dense_0, dense_1
    eye = np.eye(copies, dtype=k0.dtype)
    kernel_0 = np.kron(eye, k0)[order]  # rows are tokens
    kernel_1 = np.kron(eye, k1)[:, order]  # columns are tokens
    return (kernel_0, np.tile(b0, copies)), (kernel_1, np.tile(b1, copies)[order])


def expand_params(params, grid, factors):
    """Applies `expand_token_mlp` to every block of a {official key: array} set of weights."""
    expanded = dict(params)
    for key in params:
        if key.endswith("token_mixing/Dense_0/kernel"):
            scope = key[: -len("Dense_0/kernel")]
            names = [scope + n for n in ("Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias")]
            (k0, b0), (k1, b1) = expand_token_mlp(
                (params[names[0]], params[names[1]]), (params[names[2]], params[names[3]]), grid, factors
            )
            expanded.update(zip(names, (k0, b0, k1, b1)))
    return expanded


def expand_resolution(model, image_size):
    """A new Mixer for a larger input whose token MLPs are the block-diagonal expansion of `model`'s.

    Args:
        model: a Mixer built by this package, at input (H, W).
        image_size: (H', W') (or an int for a square image) with H' = Kh H, W' = Kw W, Kh and Kw
            positive integers (they may differ).

    Returns:
        A new model at (H', W') with `tokens_mlp_dim` multiplied by Kh Kw; every other weight copied.
        Its token features after each block equal, tile by tile, the original model's features of
        each (H, W) tile, and its pooled pre-logits are the mean of the tiles' pre-logits.
    """
    if not is_mixer(model):
        raise ValueError(f"expand_resolution needs a keras_mixer.MlpMixer, got {type(model).__name__} {model.name!r}")
    config = model.get_config()
    height, width, channels = config["input_shape"]
    new_size = to_pair("image_size", image_size)
    factors = expansion_factors((height, width), new_size)
    copies = factors[0] * factors[1]
    config.update(input_shape=(*new_size, channels), tokens_mlp_dim=config["tokens_mlp_dim"] * copies)
    expanded = type(model).from_config(config)
    assign(expanded, expand_params(model_params(model), model.grid_size, factors), f"{model.name} expanded")
    log.info(
        "Expanded %s from %dx%d to %dx%d: token MLPs block-diagonal with %d copies (D_S %d -> %d)",
        model.name,
        height,
        width,
        *new_size,
        copies,
        config["tokens_mlp_dim"] // copies,
        config["tokens_mlp_dim"],
    )
    return expanded


def trained_grid(token_count, new_grid):
    """The patch grid (h, w) that weights with `token_count` tokens were trained on, given the grid of
    the requested input, for automatic expansion. Prefers a square grid (all published weights are
    224x224); raises ValueError when no grid fits or several non-square ones do."""
    candidates = [
        (h, token_count // h)
        for h in range(1, new_grid[0] + 1)
        if token_count % h == 0 and new_grid[0] % h == 0 and new_grid[1] % (token_count // h) == 0
    ]
    square = [c for c in candidates if c[0] == c[1]]
    if len(square) == 1:
        return square[0]
    if len(candidates) == 1:
        return candidates[0]
    reason = "no patch grid divides" if not candidates else f"several grids {candidates} divide"
    raise ValueError(
        f"The weights' token MLP has {token_count} tokens and {reason} the requested {new_grid[0]}x"
        f"{new_grid[1]} patch grid evenly. Build the model at the weights' input size, load the "
        f"weights, then call keras_mixer.expand_resolution(model, image_size)."
    )
