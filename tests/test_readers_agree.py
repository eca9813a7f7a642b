"""The two readers agree: the tf.data pipeline (`pipeline`, `transforms`) and the NumPy/Pillow
reader (`arrays`) give the same evaluation images of real photographs and draw their training crops
from one distribution. Both take the parameters and the geometry from `data.crop_boxes`; the tf.data
crops come from TensorFlow's own sampler op, the reader's from `crop_boxes.inception_crop_box`.

(The readers' batches of the digits and of image folders, host shards and padding included, are
tests/test_arrays.py's.)"""

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from scipy.stats import ks_2samp

from keras_mixer import data
from keras_mixer.data import arrays, crop_boxes, transforms
from keras_mixer.data.sources import Source
from keras_mixer.model.pixels import EvalPreprocessing

# --- evaluation images ----------------------------------------------------------------------------


def _photos():
    """uint8 [h, w, 3] photographs (scikit-image's bundled ones): square, landscape at odd sizes, a
    portrait (the coffee cup turned), and a 13 x 29 patch, smaller than the views (upsampled)."""
    chelsea = skimage.data.chelsea()
    return [
        skimage.data.astronaut(),
        chelsea,
        skimage.data.coffee(),
        skimage.data.rocket(),
        np.ascontiguousarray(np.rot90(skimage.data.coffee())),
        chelsea[120:133, 200:229],
    ]


def _photo_source(photos):
    """A `Source` of `photos` that both readers read: tf.data (`make`) and NumPy (`read`)."""

    def make(input_context, shuffle_files, seed):
        spec = (tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int64))
        return tf.data.Dataset.from_generator(lambda: ((photo, 0) for photo in photos), output_signature=spec)

    labels = np.zeros(len(photos), np.int64)
    return Source("photos", "test", 1, None, len(photos), make, make_labels=lambda: labels, read=photos.__getitem__)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("eval_resize", ["crop", "resize"])
def test_both_readers_give_the_same_evaluation_images_of_photographs(eval_resize, interpolation):
    photos = _photos()
    source = _photo_source(photos)
    args = dict(image_size=(48, 64), batch_size=len(photos), eval_resize=eval_resize, interpolation=interpolation)
    (theirs, _), (ours, _) = next(iter(data.eval_pipeline(source, **args))), next(arrays.eval_batches(source, **args))
    theirs = theirs.numpy()
    assert ours.shape == theirs.shape == (len(photos), 48, 64, 3) and ours.dtype == np.float32
    # In [0, 255] units. Bilinear: the reader repeats TF's float32 operations in TF's order, equal
    # to the bit (measured 0). Bicubic: the same weights summed in another order, float32 rounding
    # (measured < 1e-4). 1e-3 leaves room for a TF build that fuses multiply-adds.
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    # A geometry a pixel off would be seen: the views a pixel apart differ by 13 to 16 levels on
    # average (measured), 10^4 times the tolerance.
    assert np.abs(ours[:, 1:] - theirs[:, :-1]).mean() > 5 and np.abs(ours[:, :, 1:] - theirs[:, :, :-1]).mean() > 5
    assert ours.min() >= 0 and ours.max() <= 255  # bicubic's overshoot clipped, as an 8-bit picture holds it
    if interpolation == "bicubic":  # the interpolation really changed
        bilinear = next(arrays.eval_batches(source, **dict(args, interpolation="bilinear")))[0]
        assert np.abs(ours - bilinear).max() > 1


@pytest.mark.parametrize("crop_ratio", [0.875, 0.9, 1.0])
def test_the_evaluation_geometry_is_the_same_on_numbers_and_in_the_graph(crop_ratio):
    # crop_boxes.eval_geometry on NumPy numbers (the reader) and on tf.shape in a tf.data graph
    # (the pipeline, the serving signature): the same sizes and windows, every shape up to 90 px
    # (among them 32 x 57 at 0.9, which float64 would size a pixel apart).
    preprocessing = EvalPreprocessing("crop", crop_ratio)
    shapes = np.stack(np.meshgrid(np.arange(1, 91), np.arange(1, 91)), -1).reshape(-1, 2)

    def in_graph(shape):
        size, window = crop_boxes.eval_geometry(shape, (24, 40), preprocessing, transforms.TENSOR_OPS)
        return tf.stack([size[0], size[1], window[0], window[1]])

    graph = next(iter(tf.data.Dataset.from_tensor_slices(shapes.astype(np.int32)).map(in_graph).batch(len(shapes))))
    geometries = (crop_boxes.eval_geometry(shape, (24, 40), preprocessing) for shape in shapes)
    numbers = np.array([(*size, *window[:2]) for size, window in geometries])
    np.testing.assert_array_equal(graph.numpy(), numbers)
    assert np.all(numbers[:, :2] >= (24, 40)) and np.all(numbers[:, 2:] * 2 <= numbers[:, :2] - (24, 40))


def test_the_evaluation_geometry_by_hand():
    crop = EvalPreprocessing("crop", 0.875)
    # 224 / 0.875 = 256: the shorter side to 256, 640 * 256 / 480 = 341.3 -> 341, the centre window.
    size, window = crop_boxes.eval_geometry((480, 640, 3), (224, 224), crop)
    assert tuple(size) == (256, 341) and window == (16, 58, 224, 224)
    size, window = crop_boxes.eval_geometry((500, 375), (224, 224), crop)
    assert tuple(size) == (341, 256) and window == (58, 16, 224, 224)
    # float32, as the graph: 57 * (24 / 0.9) / 32 is 47.49999887, 47.5 in float32, rounded to 48.
    assert tuple(crop_boxes.eval_geometry((32, 57), (24, 40), EvalPreprocessing("crop", 0.9))[0]) == (27, 48)
    # Half to even, as tf.round: 5 * 2 / 4 = 2.5 -> 2 and 7 * 2 / 4 = 3.5 -> 4 (not 3 and 4).
    whole = EvalPreprocessing("crop", 1.0)
    assert tuple(crop_boxes.eval_geometry((4, 5), (2, 2), whole)[0]) == (2, 2)
    assert crop_boxes.eval_geometry((4, 7), (2, 2), whole)[1] == (0, 1, 2, 2)
    assert crop_boxes.eval_geometry((480, 640), (224, 224), EvalPreprocessing("resize")) == ((224, 224), None)


# --- training crops -------------------------------------------------------------------------------

DRAWS = 20_000
# Two-sample Kolmogorov-Smirnov statistic of DRAWS boxes each: 0.025 is the critical value at
# alpha ~ 1e-5 (1.63 * sqrt(2 / DRAWS) is alpha = 0.01). Measured: 0.004 to 0.011 between the
# readers; 0.54 and 0.90 with the other area range, 0.57 and 0.76 with aspect ratios (3/4, 1); and
# 0.045 at 64 x 200 px for the reader's sampler computed in float64 (the kernel's is float32).
KS_LIMIT = 0.025


def _tf_boxes(shape, area_range, aspect_ratio_range=crop_boxes.ASPECT_RATIO_RANGE, seed=7, draws=DRAWS):
    """int [draws, 4] (top, left, height, width): the tf.data pipeline's crops of an image of
    `shape` (h, w), one per stateless seed (seed, i) as the pipeline makes them."""

    def box(i):
        image_shape, seeds = tf.constant([*shape, 3]), tf.stack([tf.constant(seed, tf.int64), i])
        begin, size = transforms.inception_crop_box(image_shape, seeds, area_range, aspect_ratio_range)
        return tf.stack([begin[0], begin[1], size[0], size[1]])

    return next(iter(tf.data.Dataset.range(draws).map(box).batch(draws))).numpy()


def _np_boxes(shape, area_range, aspect_ratio_range=crop_boxes.ASPECT_RATIO_RANGE, seed=7, draws=DRAWS):
    """int [draws, 4]: the NumPy reader's crops, each from its own uniform draws."""
    uniforms = np.random.default_rng(seed).random((draws, crop_boxes.MAX_ATTEMPTS, crop_boxes.DRAWS_PER_ATTEMPT))
    return np.array([crop_boxes.inception_crop_box(shape, u, area_range, aspect_ratio_range) for u in uniforms])


def _statistics(boxes, shape):
    """{name: float [n]}: each crop's area share, aspect ratio (width / height), and centre (as a
    share of the image's height and width)."""
    top, left, height, width = boxes.T
    return {
        "area": height * width / (shape[0] * shape[1]),
        "aspect": width / height,
        "centre row": (top + height / 2) / shape[0],
        "centre column": (left + width / 2) / shape[1],
    }


def _distance(boxes, other, shape):
    """{statistic: two-sample KS statistic} of two sets of boxes of an image of `shape`."""
    ours, theirs = _statistics(boxes, shape), _statistics(other, shape)
    return {name: ks_2samp(ours[name], theirs[name]).statistic for name in ours}


@pytest.mark.parametrize(
    "shape, area_range, wrong_area_range",
    [
        ((300, 451), crop_boxes.AREA_RANGE, (0.3, 1.0)),  # chelsea's size, the paper's crops
        ((64, 200), (0.3, 1.0), crop_boxes.AREA_RANGE),  # wide: heights capped, TF's rounding repairs at work
    ],
)
def test_both_readers_draw_training_crops_from_one_distribution(shape, area_range, wrong_area_range):
    tf_boxes, np_boxes = _tf_boxes(shape, area_range), _np_boxes(shape, area_range)
    for boxes in (tf_boxes, np_boxes):
        top, left, height, width = boxes.T
        # Inside the image, never on its bottom or right edge unless spanning the side (TF's offsets
        # are uniform in [0, side - crop side), one short), with an area share in the range.
        assert np.all((top >= 0) & (left >= 0) & (height > 0) & (width > 0))
        assert np.all((top + height < shape[0]) | (height == shape[0]) & (top == 0))
        assert np.all((left + width < shape[1]) | (width == shape[1]) & (left == 0))
        area = _statistics(boxes, shape)["area"]
        assert area.min() >= area_range[0] - 1e-6 and area.max() <= area_range[1]
    distances = _distance(np_boxes, tf_boxes, shape)
    assert max(distances.values()) < KS_LIMIT, distances
    # The same test fails a wrong distribution: another area range, another aspect ratio range.
    assert _distance(_np_boxes(shape, wrong_area_range), tf_boxes, shape)["area"] > 10 * KS_LIMIT
    assert _distance(_np_boxes(shape, area_range, (3 / 4, 1.0)), tf_boxes, shape)["aspect"] > 10 * KS_LIMIT


def test_the_paper_crops_spread_over_the_area_range():
    # TF's sampler at the paper's range: from a twentieth of the image to all of it, not a few sizes.
    area = _statistics(_tf_boxes((100, 120), crop_boxes.AREA_RANGE), (100, 120))["area"]
    assert area.min() < 0.06 and area.max() > 0.95
    assert np.quantile(area, 0.1) < 0.2 and np.quantile(area, 0.9) > 0.7
    assert len(np.unique(np.round(area, 2))) > 50


@pytest.mark.parametrize(
    "shape, area_range",
    [((32, 48), (1.0, 1.0)), ((20, 400), (0.3, 1.0))],  # no aspect ratio of 1.5; the widest box covers 7 %
)
def test_both_readers_take_the_whole_image_when_no_crop_fits(shape, area_range):
    whole = np.broadcast_to([0, 0, *shape], (100, 4))
    np.testing.assert_array_equal(_tf_boxes(shape, area_range, draws=100), whole)
    np.testing.assert_array_equal(_np_boxes(shape, area_range, draws=100), whole)
