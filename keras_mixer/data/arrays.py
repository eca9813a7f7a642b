"""Training and evaluation batches of a `Source` with NumPy and Pillow only: no TensorFlow.

The counterpart of `pipeline.train_pipeline` / `pipeline.eval_pipeline` for a machine with JAX and
no TensorFlow; it reads the sources that can be read without it (`Source.read`: the digits and
image folders).

    train: epoch permutation of this host's examples -> Inception crop -> bilinear resize -> flip
           -> batch -> [mixup]                         (forever, `threads` threads ahead)
    eval:  resize shorter side + centre crop (or plain resize) -> batch [-> pad + mask]

Both readers take the augmentations' parameters and geometry from `crop_boxes`. The evaluation
images equal the tf.data pipeline's (the same sizes and windows, TF's resize arithmetic in float32).
The training crops follow the same distribution (`crop_boxes.inception_crop_box`, TensorFlow's
sampler from uniform numbers) but not the same random numbers: a seeded stream repeats itself here,
not the tf.data one.

Randomness is a pure function of (seed, host, epoch) for the order and (seed, host, step) for the
augmentation of a batch, so a stream resumed with `skip_steps` jumps there without reading or
augmenting anything it skips.
"""

import collections
import concurrent.futures
import functools
import itertools
import math

import numpy as np

from keras_mixer.argument_checks import check_positive_int, to_pair
from keras_mixer.data.crop_boxes import AREA_RANGE, DRAWS_PER_ATTEMPT, MAX_ATTEMPTS, eval_geometry, inception_crop_box
from keras_mixer.model.pixels import EvalPreprocessing

# Domains of the random streams derived from one seed, so they never share numbers.
_ORDER, _AUGMENT = 0, 1


# --- resizing -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _axis(in_size, out_size, start, count, channels=1):
    """(neighbours int [2 * count * channels], lerp float32 [count * channels]) of output positions
    start .. start + count - 1 of a bilinear resize of one axis from `in_size` to `out_size`: the
    lower neighbours then the upper ones, and the upper one's weight; with `channels`, as flat
    indices into rows of `channels` values per position (the columns of an [h, w * C] image).

    TensorFlow's half-pixel arithmetic, in float32 as its kernel does it: source coordinate
    (i + 0.5) * in / out - 0.5, the two neighbours clamped to the image, the weight of the upper one
    the coordinate's fractional part. Cached (read-only arrays): crops repeat a few sizes, and
    building these costs more than the interpolation of a small image."""
    scale = np.float32(in_size) / np.float32(out_size)
    centres = (np.arange(start, start + count, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centres)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(centres), in_size - 1).astype(np.intp)
    both = (np.concatenate([lower, upper])[:, None] * channels + np.arange(channels)).reshape(-1)
    lerp = np.repeat(centres - floor, channels)
    both.flags.writeable = lerp.flags.writeable = False
    return both, lerp


def _neighbours(image, size, window=None):
    """What the bilinear resize of `image` [h, w, C] to `size` (H, W) reads, for the `window`
    (top, left, height, width) of its output (default all of it): (corners [2 * height,
    2 * width * C] in the image's dtype, row weights float32 [height], column weights float32
    [width * C]). The corners' quarters are the top-left, top-right, bottom-left and bottom-right
    neighbour of every output value."""
    (in_h, in_w, channels), (out_h, out_w) = image.shape, size
    top, left, height, width = window if window is not None else (0, 0, out_h, out_w)
    rows, wy = _axis(in_h, out_h, top, height)
    cols, wx = _axis(in_w, out_w, left, width, channels)
    # Rows first, still in the image's dtype (a large image is not converted whole), then columns.
    return np.take(image[rows].reshape(2 * height, in_w * channels), cols, axis=1), wy, wx


def _interpolate(corners, wy, wx):
    """float32 [..., height, width * C] from `_neighbours`' (corners float32 [..., 2 * height,
    2 * width * C], wy [..., height], wx [..., width * C]), any leading (batch) dimensions."""
    height, width = wy.shape[-1], wx.shape[-1]
    top_left, top_right = corners[..., :height, :width], corners[..., :height, width:]
    bottom_left, bottom_right = corners[..., height:, :width], corners[..., height:, width:]
    wx, wy = wx[..., None, :], wy[..., :, None]
    # TF's kernel's operations in its order, so the float32 results agree to the last bit:
    # upper = tl + (tr - tl) * wx, lower = bl + (br - bl) * wx, upper + (lower - upper) * wy.
    upper = top_right - top_left
    upper *= wx
    upper += top_left
    lower = bottom_right - bottom_left
    lower *= wx
    lower += bottom_left
    lower -= upper
    lower *= wy
    lower += upper
    return lower


def resize_bilinear(image, size, window=None):
    """`image` (uint8 or float [h, w, C]) resized to `size` (H, W), as
    `tf.image.resize(image, size, method="bilinear", antialias=False)`. Returns float32.

    window: (top, left, height, width): only that window of the resized image, float32
        [height, width, C] (a centre crop without computing the pixels it drops). Default the whole
        [H, W, C].
    """
    corners, wy, wx = _neighbours(image, size, window)
    return _interpolate(corners.astype(np.float32), wy, wx).reshape(len(wy), -1, image.shape[2])


def _cubic_weights(in_size, out_size, start, count):
    """float32 [count, in_size]: row i holds the weights of output position start + i of a bicubic
    resize of one axis, as TensorFlow's: half-pixel centres (float32), Keys' cubic with a = -0.5
    read from a table of 1024 steps (the fraction rounded to 1/1024), the taps outside the image
    dropped and the others' weights renormalised to sum to 1."""
    scale = np.float32(in_size) / np.float32(out_size)
    centres = (np.arange(start, start + count, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centres)
    fraction = np.rint((centres - floor) * 1024) / 1024
    weights = np.zeros((count, in_size), np.float64)
    for tap in range(-1, 3):
        index = floor + tap
        distance = np.abs(fraction - tap)
        near = (1.5 * distance - 2.5) * distance**2 + 1  # |d| <= 1
        far = ((-0.5 * distance + 2.5) * distance - 4) * distance + 2  # 1 < |d| < 2
        weight = np.where(distance <= 1, near, np.where(distance < 2, far, 0.0))
        inside = (index >= 0) & (index < in_size)
        weights[np.arange(count)[inside], index[inside].astype(np.intp)] += weight[inside]
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_bicubic(image, size, window=None):
    """`image` (uint8 or float [h, w, C]) resized to `size` (H, W) as
    `tf.image.resize(image, size, method="bicubic", antialias=False)`, clipped to [0, 255] as the
    TF pipeline clips it; equal to float32 rounding. `window` as `resize_bilinear`'s."""
    top, left, height, width = window if window is not None else (0, 0, *size)
    rows = _cubic_weights(image.shape[0], size[0], top, height)
    cols = _cubic_weights(image.shape[1], size[1], left, width)
    resized = np.einsum("yh,hwc,xw->yxc", rows, image.astype(np.float32), cols, optimize=True)
    return np.clip(resized, 0.0, 255.0).astype(np.float32)


# Corners of at most this many bytes are interpolated together: the whole batch for small images,
# a few at a time for large ones (a 224 px view's corners take 2.4 MB).
_CHUNK_BYTES = 8 << 20


class _Views:
    """Fills `out` (float32 [n, H, W, C]) with bilinear views, one after the other: each view's
    neighbours are gathered when it is added, and the arithmetic runs on a chunk of views at once
    (NumPy's per-call overhead, not the pixels, is what a small image's resize costs)."""

    def __init__(self, out):
        count, height, width, channels = out.shape
        self.out, self.shape, self.start, self.filled = out, out.shape[1:], 0, 0
        self.chunk = max(1, min(count, _CHUNK_BYTES // (16 * height * width * channels)))
        self.corners = np.zeros((self.chunk, 2 * height, 2 * width * channels), np.float32)
        self.wy = np.zeros((self.chunk, height), np.float32)
        self.wx = np.zeros((self.chunk, width * channels), np.float32)

    def add(self, image, size, window=None):
        """The next view: `image` resized to `size` (H, W) or that `window` of it (as
        `resize_bilinear`), which must be [H, W] of `out`."""
        i = self.filled
        self.corners[i], self.wy[i], self.wx[i] = _neighbours(image, size, window)
        self.filled += 1
        if self.filled == self.chunk:
            self.flush()

    def flush(self):
        count = self.filled
        if count:
            views = _interpolate(self.corners[:count], self.wy[:count], self.wx[:count])
            self.out[self.start : self.start + count] = views.reshape(count, *self.shape)
        self.start, self.filled = self.start + count, 0


def eval_image(image, image_size, preprocessing):
    """An image uint8 [h, w, 3] of any size -> float32 [H, W, 3] as `preprocessing` (an
    `EvalPreprocessing`) says, as `transforms.eval_image`: resized and cropped to the size and
    window of `crop_boxes.eval_geometry` ("crop": shorter side to size / crop_ratio, centre crop;
    "resize": the whole image squeezed). Bilinear to the last bit of TensorFlow's; bicubic to
    float32 rounding (`resize_bicubic`).
    """
    resize = resize_bicubic if preprocessing.interpolation == "bicubic" else resize_bilinear
    return resize(image, *eval_geometry(image.shape, image_size, preprocessing))


def train_image(image, image_size, uniforms, flip_draw, area_range=AREA_RANGE, flip=True):
    """One training view of `image` (uint8 [h, w, 3]): Inception crop (`uniforms` as
    `crop_boxes.inception_crop_box`), bilinear resize to `image_size` (H, W), flipped left-right
    when `flip` and `flip_draw` (a uniform in [0, 1)) < 0.5. Returns float32 [H, W, 3] in [0, 255]."""
    top, left, height, width = inception_crop_box(image.shape, uniforms, area_range)
    view = resize_bilinear(image[top : top + height, left : left + width], image_size)
    return view[:, ::-1] if flip and flip_draw < 0.5 else view


# --- streams --------------------------------------------------------------------------------------


def _readable(source):
    """Raises the one-line ValueError for a source only tf.data can read."""
    if getattr(source, "read", None) is None:
        raise ValueError(
            f"{source.name} split {source.split!r} is read only through TensorFlow (tf.data / TFDS): install "
            f"tensorflow, or use digits or folder:PATH, which are read without it"
        )
    if source.num_examples is None:
        raise ValueError(f"{source.name} split {source.split!r} has an unknown size; the array reader needs it")


def _host_batch(batch_size, host, hosts):
    """This host's share of the global batch; ValueError unless hosts divide it."""
    batch_size, hosts = check_positive_int("batch_size", batch_size), check_positive_int("hosts", hosts)
    if isinstance(host, bool) or not isinstance(host, int) and not hasattr(host, "__index__"):
        raise ValueError(f"host must be an integer in 0 .. {hosts - 1}, got {host!r}")
    if not 0 <= int(host) < hosts:
        raise ValueError(f"host must be in 0 .. {hosts - 1} for {hosts} hosts, got {host!r}")
    if batch_size % hosts:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the {hosts} hosts (each reads batch_size / hosts)"
        )
    return batch_size // hosts


def _host_positions(source, host, hosts):
    """int64 [n] this host's positions in the split, as tf.data's shard(hosts, host): h, h + hosts, ..."""
    return np.arange(int(host), source.num_examples, hosts, dtype=np.int64)


def _one_hot(labels, num_classes):
    return np.eye(num_classes, dtype=np.float32)[labels]


def _in_order(make, steps, threads, ahead):
    """Yields make(step) for each of `steps` in order, computed by `threads` threads up to `ahead`
    steps ahead of the consumer: the order is the steps', whichever thread finishes first."""
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="keras_mixer_arrays")
    pending = collections.deque()
    steps = iter(steps)
    try:
        for step in itertools.islice(steps, ahead):
            pending.append(pool.submit(make, step))
        while pending:
            done = pending.popleft()
            for step in itertools.islice(steps, 1):
                pending.append(pool.submit(make, step))
            yield done.result()
    finally:
        # A consumer that stops early (close(), garbage collection, even at interpreter exit) does
        # not wait for batches it will not take. Cancelled here rather than by shutdown's
        # cancel_futures, which needs module globals that interpreter exit may have cleared.
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False)


def _check_threads(threads, ahead):
    threads, ahead = check_positive_int("threads", threads), check_positive_int("ahead", ahead)
    return threads, max(ahead, threads)  # fewer batches in flight than threads would idle some


def _base_seed(seed):
    """A non-negative int for np.random.SeedSequence; None draws one, so runs differ."""
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    if isinstance(seed, bool) or not isinstance(seed, int) and not hasattr(seed, "__index__"):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    return int(seed) % (1 << 64)  # negative seeds too, each to its own stream


def _rng(base, domain, host, index):
    # The index goes in the spawn key, hashed apart from the seed: (seed, step) pairs never collide.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(base, spawn_key=(domain, int(host), index))))


def train_batches(
    source,
    *,
    image_size,
    batch_size,
    seed,
    host=0,
    hosts=1,
    shuffle_buffer=10_000,
    mixup=None,
    one_hot=False,
    area_range=AREA_RANGE,
    flip=True,
    skip_steps=0,
    randaugment=None,
    threads=2,
    ahead=2,
):
    """One host's training batches, shuffled, augmented, repeated forever, as
    `pipeline.train_pipeline` makes them (without TensorFlow).

    Args:
        source: a `keras_mixer.data.Source` with `read` (the digits, an image folder).
        image_size: (H, W) or an int.
        batch_size: the global batch; this host gets batch_size / hosts examples a step.
        seed: fixes the order and every random transform: the same seed gives the same batches.
            None: a fresh seed, so runs differ.
        host, hosts: this host reads examples host, host + hosts, ... of the split (tf.data's
            shard(hosts, host)), shuffled anew every epoch.
        shuffle_buffer: accepted for `train_pipeline`'s signature; each epoch is a full permutation
            of the host's examples (as the tf.data pipeline's buffer is for the digits, and its
            whole-file-list shuffle for folders).
        mixup: None or the Beta alpha: each image mixed with another of the batch (a random
            permutation; possibly itself) with weight w ~ Beta(alpha, alpha), one w per example, the
            one-hot labels with the same w (keras.layers.MixUp). 0: one-hot labels, no mixing.
        one_hot: one-hot labels [b, classes] (always with mixup), else int labels [b].
        area_range: the Inception crop's area share range; (1, 1): no crop.
        flip: random horizontal flips.
        skip_steps: resume inside the stream: the first batch is the one an uninterrupted stream
            of the same seed gives after `skip_steps` batches (nothing skipped is read).
        randaugment: must be None (or 0): RandAugment is tf.data's only.
        threads, ahead: threads preparing batches, and how many batches they keep ready.

    Returns:
        An iterator of (images float32 [b, H, W, 3] in [0, 255], labels int64 [b] or float32
        [b, classes]), b = batch_size / hosts, forever.
    """
    if randaugment:
        raise ValueError(
            "--randaugment needs TensorFlow's input pipeline (keras.layers.RandAugment on tf.data); install "
            "tensorflow or set --randaugment 0"
        )
    _readable(source)
    image_size = to_pair("image_size", image_size)
    per_host = _host_batch(batch_size, host, hosts)
    check_positive_int("shuffle_buffer", shuffle_buffer)
    area_range = (float(area_range[0]), float(area_range[1]))
    if not 0 < area_range[0] <= area_range[1] <= 1:
        raise ValueError(f"area_range must satisfy 0 < low <= high <= 1, got {area_range!r}")
    if mixup is not None and not mixup >= 0:  # negative or NaN; 0 is "one-hot labels, no mixing"
        raise ValueError(f"mixup alpha must be positive, got {mixup!r}")
    if isinstance(skip_steps, bool) or not hasattr(skip_steps, "__index__") or int(skip_steps) < 0:
        raise ValueError(f"skip_steps must be a non-negative integer, got {skip_steps!r}")
    threads, ahead = _check_threads(threads, ahead)
    positions = _host_positions(source, host, hosts)
    if not len(positions):
        raise ValueError(f"host {host} of {hosts} has no examples of {source.name} split {source.split!r}")
    labels = source.labels()
    one_hot = one_hot or mixup is not None  # as train_pipeline: mixup=0 still gives one-hot labels
    base = _base_seed(seed)
    count = len(positions)
    orders = {}  # epoch -> this host's positions in that epoch's order; the last few epochs only

    def order(epoch):
        if epoch not in orders:
            if len(orders) >= 2:
                del orders[min(orders)]
            orders[epoch] = positions[_rng(base, _ORDER, host, epoch).permutation(count)]
        return orders[epoch]

    def schedule(step):
        """(step, positions int64 [b]) of batch `step`: visits step * b .. (step + 1) * b - 1 of the
        stream of epochs; a batch may straddle two epochs, as tf.data's repeat-then-batch does."""
        visits = step * per_host + np.arange(per_host)
        epochs, places = np.divmod(visits, count)
        chosen = np.empty(per_host, np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            chosen[here] = order(int(epoch))[places[here]]
        return step, chosen

    def make(scheduled):
        step, chosen = scheduled
        rng = _rng(base, _AUGMENT, host, step)
        # A fixed count of draws per batch whatever the images: the stream stays a function of
        # (seed, step) alone.
        crops = rng.random((per_host, MAX_ATTEMPTS, DRAWS_PER_ATTEMPT))
        flips = rng.random(per_host)
        images = np.empty((per_host, *image_size, 3), np.float32)
        views = _Views(images)
        for i, position in enumerate(chosen):
            image = source.read(position)
            top, left, height, width = inception_crop_box(image.shape, crops[i], area_range)
            views.add(image[top : top + height, left : left + width], image_size)
        views.flush()
        if flip:
            flipped = flips < 0.5
            images[flipped] = images[flipped, :, ::-1]
        batch_labels = labels[chosen]
        if not one_hot:
            return images, batch_labels
        batch_labels = _one_hot(batch_labels, source.num_classes)
        if mixup:
            partners = rng.permutation(per_host)
            weights = rng.beta(mixup, mixup, per_host).astype(np.float32)
            w = weights[:, None, None, None]
            images = w * images + (1 - w) * images[partners]
            # The sum of two float32 products may overshoot 255 by an ulp.
            np.clip(images, 0, 255, out=images)
            batch_labels = weights[:, None] * batch_labels + (1 - weights[:, None]) * batch_labels[partners]
        return images, batch_labels

    # The order is drawn in the consumer's thread (cheap, and the epoch cache needs no lock).
    return _in_order(make, map(schedule, itertools.count(int(skip_steps))), threads, ahead)


def eval_batches(
    source,
    *,
    image_size,
    batch_size,
    host=0,
    hosts=1,
    eval_resize="crop",
    crop_ratio=0.875,
    interpolation="bilinear",
    pad_to_steps=None,
    one_hot=False,
    threads=2,
    ahead=2,
):
    """One host's evaluation batches: each of its examples once, in split order, as
    `pipeline.eval_pipeline` makes them (without TensorFlow).

    Args:
        source: a `keras_mixer.data.Source` with `read`.
        image_size: (H, W) or an int.
        batch_size: the global batch; this host gets batch_size / hosts examples a step.
        host, hosts: this host reads examples host, host + hosts, ... (tf.data's shard).
        eval_resize, crop_ratio, interpolation: as `EvalPreprocessing` ("crop": shorter side to
            size / ratio, centre crop; "resize": the whole image to the size; bilinear or bicubic).
        pad_to_steps: exactly this many full batches, the real examples then zero images with
            label 0 (all-zero rows when one-hot), and a mask [b] (1 real, 0 padding), so every host
            runs the same number of steps. ValueError when the host's examples do not fit.
        one_hot: one-hot labels [b, classes], else int labels [b].
        threads, ahead: threads preparing batches, and how many batches they keep ready.

    Returns:
        An iterator of (images float32 [b, H, W, 3], labels int64 [b] or float32 [b, classes]),
        b = batch_size / hosts (the last batch partial), plus mask float32 [b] with `pad_to_steps`.
    """
    _readable(source)
    preprocessing = EvalPreprocessing(eval_resize, crop_ratio, interpolation)
    image_size = to_pair("image_size", image_size)
    per_host = _host_batch(batch_size, host, hosts)
    threads, ahead = _check_threads(threads, ahead)
    positions = _host_positions(source, host, hosts)
    labels = source.labels()
    if pad_to_steps is None:
        steps = math.ceil(len(positions) / per_host)
    else:
        steps = check_positive_int("pad_to_steps", pad_to_steps)
        if steps * per_host < len(positions):
            raise ValueError(
                f"pad_to_steps {steps} of {per_host} examples cannot hold host {host}'s {len(positions)} examples of "
                f"{source.name} split {source.split!r}: give at least {math.ceil(len(positions) / per_host)}"
            )

    def make(step):
        chosen = positions[step * per_host : (step + 1) * per_host]
        size = per_host if pad_to_steps is not None else len(chosen)
        images = np.zeros((size, *image_size, 3), np.float32)  # padding rows stay zero
        views = _Views(images)
        for row, position in enumerate(chosen):
            image = source.read(position)
            if preprocessing.interpolation == "bicubic":
                images[row] = eval_image(image, image_size, preprocessing)
            else:
                views.add(image, *eval_geometry(image.shape, image_size, preprocessing))
        views.flush()
        batch_labels = np.zeros(size, np.int64)
        batch_labels[: len(chosen)] = labels[chosen]
        if one_hot:
            batch_labels = _one_hot(batch_labels, source.num_classes)
            batch_labels[len(chosen) :] = 0  # padding: no class
        if pad_to_steps is None:
            return images, batch_labels
        mask = np.zeros(size, np.float32)
        mask[: len(chosen)] = 1
        return images, batch_labels, mask

    return _in_order(make, range(steps), threads, ahead)
