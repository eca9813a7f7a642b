"""Token-mixing pictures (paper section 3.5, Fig. 5): the first token-mixing layer's hidden units
drawn on the patch grid.

Unit u of block i's token MLP has one weight per token: column u of `Dense_0`'s kernel [S, D_S].
Reshaped row-major to the (H/P, W/P) patch grid it shows which image regions the unit adds up and
with which sign. The paper finds pairs of units of opposite phase (w and roughly -w), global units
in the first block and more local ones later.

Choices:

* Pairing: two units pair when the cosine of their kernel columns is at most `pair_below`
  (default `chance_cosine`: -0.5, or lower where random units would get there by chance); pairs
  are taken greedily, most negative cosine first, each unit in at most one pair. The cosine, not
  the Pearson correlation: a unit's mean over the tokens is part of its pattern (w and -w + c are
  not opposite), and a uniform unit, which has no Pearson correlation, still pairs with its
  negative. The threshold keeps unrelated units apart: among 32 random 16-weight columns (a 4x4
  grid) about six pairs reach -0.5, among 384 of 196 weights (B/16) none. An odd count
  (or any unit without an opposite) leaves units unpaired; they come after the pairs, on a new row.
* Order: pairs from low to high spatial frequency, as Fig. 5 sorts them (the power-weighted mean
  frequency of the unit's 2-D Fourier transform), then the unpaired units the same way. With
  `units=N` the first N of this order are drawn.
* Colours: `RdBu_r`, limits symmetric around 0 so white is 0, red positive, blue negative. By
  default each unit is scaled to its own max |w| (`scale="unit"`): units of one layer differ a
  lot in norm and a shared scale washes the small ones out; `scale="block"` uses one max |w| per
  block to compare magnitudes.
* A model expanded to a larger input by `keras_mixer.expand_resolution` (App. C) has a block-
  diagonal token MLP (identical tiles, up to a token permutation): its picture is one tile, the
  units of one sub-image on the trained grid, which are exactly the trained model's units.

The PNG is drawn pixel for pixel (no resampling): each token is a `token_pixels` square, so the
picture can be checked by reading its pixels back.
"""

import math
import os

import numpy as np

from keras_mixer.atomic_files import atomic_write, write_json
from keras_mixer.model.mixer import MlpMixer
from keras_mixer.model.resolution_expansion import token_order

COLORMAP = "RdBu_r"
SCALES = ("unit", "block")
DEFAULT_BLOCKS = (0, 1, 2)
_BACKGROUND = (1.0, 1.0, 1.0, 1.0)


def _tile_of(kernel, grid):
    """The trained tile of a block-diagonal (expanded) token kernel, or None.

    kernel: Dense_0 kernel [S', D_S'] on the (gh, gw) grid. Tries every factorisation (Kh, Kw) of
    the grid, finest first (an expansion of an expansion is one finer expansion), and returns
    ((h, w), (Kh, Kw), tile kernel [h w, D_S' / (Kh Kw)]) for the first under which the kernel, in
    the sub-grid token order `expand_token_mlp` uses, is block diagonal with identical blocks.
    Requiring identical blocks keeps a kernel that merely has sparse units (a one-hot unit lies in
    one sub-grid of any split) from being cut. Tiles of one token have nothing to mix: skipped.
    A kernel that is exactly an expansion is drawn as one whatever its history (a 4x4-grid identity
    with D_S = 16 is the 4x2 expansion of a 1x2 identity); trained weights are never exact copies.
    """
    (gh, gw), (tokens, width) = grid, kernel.shape
    splits = [
        (kh, kw)
        for kh in range(1, gh + 1)
        for kw in range(1, gw + 1)
        if gh % kh == 0 and gw % kw == 0 and 1 < kh * kw < tokens and width % (kh * kw) == 0
    ]
    for kh, kw in sorted(splits, key=lambda f: -f[0] * f[1]):
        copies, tile_grid = kh * kw, (gh // kh, gw // kw)
        blocked = np.empty_like(kernel)
        blocked[token_order(tile_grid, (kh, kw))] = kernel  # rows back to sub-grid order
        # [copy of rows, tile token, copy of columns, tile unit]
        blocks = blocked.reshape(copies, tokens // copies, copies, width // copies)
        diagonal = blocks[np.arange(copies), :, np.arange(copies)]  # [copies, tile tokens, tile units]
        off_diagonal = blocks.copy()
        off_diagonal[np.arange(copies), :, np.arange(copies)] = 0
        if not off_diagonal.any() and np.allclose(diagonal, diagonal[:1], rtol=1e-6, atol=0):
            return tile_grid, (kh, kw), diagonal[0]
    return None


def token_mixing_units(model, block):
    """Block `block`'s first token-mixing layer as pictures: (units [D, h, w] float32, info).

    Unit u is column u of `MixerBlock_{block}/token_mixing/Dense_0/kernel` reshaped row-major to
    the patch grid (h, w) = `model.grid_size`, so units[u, r, c] weighs the token of patch row r,
    column c. For an expanded model (see `_tile_of`) the units are those of one tile on the trained
    grid (D = D_S / (Kh Kw)). info: {"grid": [h, w], "model_grid": the model's grid, "expansion":
    [Kh, Kw] or None, "units": D}.
    """
    if not isinstance(model, MlpMixer):
        raise ValueError(f"{model.name!r} is not a keras_mixer.MlpMixer: no token-mixing layers to draw")
    depth = model.num_blocks
    if not 0 <= block < depth:
        raise ValueError(f"block {block} is out of range: model {model.name!r} has {depth} blocks (0 to {depth - 1})")
    dense = model.get_layer(f"MixerBlock_{block}").token_mixing.dense_0
    kernel = np.asarray(dense.kernel.numpy(), dtype=np.float32)  # [S, D_S]
    grid = tuple(model.grid_size)
    tile = _tile_of(kernel, grid)
    expansion = None
    if tile is not None:
        grid, expansion, kernel = tile
    units = kernel.T.reshape(-1, *grid)  # the stem flattens the grid row-major
    expansion = expansion and list(expansion)
    return units, dict(grid=list(grid), model_grid=list(model.grid_size), expansion=expansion, units=len(units))


def _cosines(units):
    """[D, D] cosine similarity of the units' weight vectors (0 for an all-zero unit)."""
    flat = units.reshape(len(units), -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1)
    flat = flat / np.where(norms > 0, norms, 1)[:, None]
    return flat @ flat.T


def spatial_frequency(units):
    """[D] power-weighted mean spatial frequency (cycles per token) of each unit [D, h, w]: 0 for a
    uniform unit, about 0.7 for a checkerboard."""
    power = np.abs(np.fft.fft2(units.astype(np.float64))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(units.shape[1]), np.fft.fftfreq(units.shape[2]), indexing="ij")
    radius = np.hypot(fy, fx)
    total = power.sum(axis=(1, 2))
    return (power * radius).sum(axis=(1, 2)) / np.where(total > 0, total, 1)


def chance_cosine(tokens, count):
    """The default pairing threshold: the lower of -0.5 and the most negative cosine that `count`
    random units of `tokens` weights reach by chance, about -sqrt(2 ln(count^2 / 2) / tokens) (a
    random pair's cosine is about normal with variance 1 / tokens; the minimum of n such draws
    lies near -sqrt(2 ln n) standard deviations). 4x4 grid, 32 units: -0.88; B/16: -0.5."""
    pairs = max(2.0, count * (count - 1) / 2)
    return max(-1.0, min(-0.5, -math.sqrt(2 * math.log(pairs) / max(tokens, 1))))


def opposite_phase_order(units, pair_below=None):
    """Orders units [D, h, w] so that opposite-phase pairs sit side by side.

    Returns (order, pairs, unpaired): order, a permutation of range(D): the pairs' units (i, j)
    one after the other, pairs from low to high spatial frequency, then the unpaired units; pairs,
    a list of (i, j, cosine) in that order; unpaired, the remaining unit indices in order.
    `pair_below` None: `chance_cosine` of these units.
    """
    if pair_below is None:
        pair_below = chance_cosine(units[0].size, len(units))
    if not -1 <= pair_below <= 0:
        raise ValueError(f"pair_below must be a cosine between -1 and 0, got {pair_below}")
    cosines = _cosines(units)
    rows, cols = np.triu_indices(len(units), k=1)
    ranked = np.argsort(cosines[rows, cols], kind="stable")
    taken, pairs = np.zeros(len(units), bool), []
    for k in ranked:
        i, j = int(rows[k]), int(cols[k])
        if cosines[i, j] > pair_below:
            break
        if not taken[i] and not taken[j]:
            taken[i] = taken[j] = True
            pairs.append((i, j, float(cosines[i, j])))
    frequency = spatial_frequency(units)
    pairs.sort(key=lambda p: (frequency[p[0]] + frequency[p[1]], p[0]))
    unpaired = sorted(np.flatnonzero(~taken).tolist(), key=lambda u: (frequency[u], u))
    order = [u for i, j, _ in pairs for u in (i, j)] + unpaired
    return np.array(order, dtype=int), pairs, unpaired


def _layout(count, paired, grid, token_pixels):
    """Top-left pixel (x, y) of each of `count` drawn cells in a block's mosaic, and its (width,
    height). The first `paired` cells are pairs: an even number of columns, a narrow gap inside a
    pair and a wide one between pairs. The unpaired cells start on a new row, evenly spaced, so
    that neighbours there do not look like pairs."""
    (gh, gw), z = grid, token_pixels
    columns = min(max(2, 2 * round(math.sqrt(count * gh / gw) / 2)), count)
    inner, outer = max(1, z // 2), 2 * z
    pair_x = np.cumsum([0] + [gw * z + (inner if c % 2 else outer) for c in range(1, columns)])
    even_x = np.arange(columns) * (gw * z + (inner + outer) // 2)
    cells, row, position = [], 0, 0
    for k in range(count):
        if k == paired and position:
            row, position = row + 1, 0
        cells.append((int((pair_x if k < paired else even_x)[position]), row * (gh * z + outer)))
        position += 1
        if position == columns:
            row, position = row + 1, 0
    width = max(x for x, _ in cells) + gw * z
    height = max(y for _, y in cells) + gh * z
    return cells, (width, height)


def _mosaic(images, cells, size, grid, token_pixels, limits):
    """RGBA mosaic [height, width, 4] float: image k (values [h, w]) coloured with limits ±limits[k]."""
    from matplotlib import colormaps

    cmap = colormaps[COLORMAP]
    mosaic = np.empty((size[1], size[0], 4), np.float32)
    mosaic[:] = _BACKGROUND
    z = token_pixels
    for image, (x, y), limit in zip(images, cells, limits):
        scaled = 0.5 + 0.5 * image / (limit if limit > 0 else 1.0)  # -limit -> 0, 0 -> 0.5, +limit -> 1
        pixels = np.repeat(np.repeat(cmap(scaled), z, axis=0), z, axis=1)
        mosaic[y : y + grid[0] * z, x : x + grid[1] * z] = pixels
    return mosaic


def token_pixels_for(grid):
    """Pixels per token side: a unit's picture is at least ~32 pixels on its long side."""
    return max(1, math.ceil(32 / max(grid)))


def draw(model, out, blocks=DEFAULT_BLOCKS, units=None, scale="unit", pair_below=None, title=None):
    """Writes the token-mixing picture of `blocks` to the PNG `out` and a JSON sidecar beside it.

    Args:
        model: a keras_mixer.MlpMixer.
        out: the .png path; the sidecar is the same path with .json.
        blocks: block indices, each drawn as one mosaic, left to right.
        units: how many units per block to draw, the first of `opposite_phase_order`; None: all.
        scale: "unit" (each unit to its own max |w|) or "block" (one max |w| per block).
        pair_below: the cosine at or below which two units count as an opposite-phase pair
            (None: `chance_cosine` per block).
        title: the figure's title (default: the model's name).

    Returns:
        A list, per block, of dicts: the JSON fields (block, grid, model_grid, expansion, units,
        drawn, pairs, unpaired, scale) and, for checking the picture, "images" [n, h, w] (the drawn
        units in order), "cells" (top-left pixel (x, y) of each in the PNG) and "token_pixels".
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if units is not None and units < 1:
        raise ValueError(f"units must be a positive count (or None for all), got {units}")
    if not str(out).lower().endswith(".png"):
        raise ValueError(f"the picture {str(out)!r} must be a .png file")
    if not blocks:
        raise ValueError("no blocks to draw")

    dpi, margin, header, footer, min_slot = 100, 20, 50, 30, 230
    results, mosaics = [], []
    for block in blocks:
        all_units, info = token_mixing_units(model, block)
        threshold = chance_cosine(all_units[0].size, len(all_units)) if pair_below is None else pair_below
        order, pairs, unpaired = opposite_phase_order(all_units, threshold)
        drawn = order[: units or len(order)]
        paired = min(len(drawn), 2 * len(pairs))
        z = token_pixels_for(info["grid"])
        cells, size = _layout(len(drawn), paired, info["grid"], z)
        images = all_units[drawn]
        peak = np.abs(images).reshape(len(images), -1).max(axis=1)
        limits = peak if scale == "unit" else np.full(len(images), peak.max())
        mosaics.append((_mosaic(images, cells, size, info["grid"], z, limits), size))
        results.append(
            dict(
                block=block,
                **info,
                drawn=drawn.tolist(),
                scale=scale,
                pair_below=round(threshold, 4),
                pairs=[dict(units=[i, j], cosine=round(c, 4)) for i, j, c in pairs],
                unpaired=unpaired,
                images=images,
                cells=cells,
                token_pixels=z,
            )
        )

    # Mosaics side by side, top-aligned, placed with figimage: one PNG pixel per mosaic pixel.
    # A block's slot is at least as wide as its caption; the figure at least as wide as the legend.
    slots = [max(size[0], min_slot) for _, size in mosaics]
    width = max(margin + sum(slot + margin for slot in slots), 560)
    height = header + max(size[1] for _, size in mosaics) + footer
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    x = margin
    for (mosaic, size), slot, result in zip(mosaics, slots, results):
        fig.figimage(mosaic, xo=x, yo=height - header - size[1], origin="upper")
        result["cells"] = [(x + cx, header + cy) for cx, cy in result["cells"]]
        (gh, gw), expansion = result["grid"], result["expansion"]
        caption = f"block {result['block']}: {len(result['drawn'])} of {result['units']} units, "
        caption += f"{len(result['pairs'])} pairs\n{gh}x{gw} tokens"
        if expansion:
            caption += f" (one tile of a {expansion[0]}x{expansion[1]} expansion)"
        fig.text(x / width, 1 - 4 / height, caption, va="top", ha="left", fontsize=8)
        x += slot + margin
    scaling = "each unit scaled to its own max |w|" if scale == "unit" else "one scale per block"
    legend = f"red +, blue -, white 0; {scaling}"
    fig.text(margin / width, 6 / height, f"{title or model.name}: first token-mixing layer. {legend}", fontsize=8)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=dpi))
    write_json(
        os.path.splitext(os.fspath(out))[0] + ".json",
        dict(
            source=title or model.name,
            colormap=COLORMAP,
            blocks=[{k: v for k, v in r.items() if k not in ("images", "cells", "token_pixels")} for r in results],
        ),
    )
    return results
