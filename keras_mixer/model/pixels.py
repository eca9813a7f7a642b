"""How pixels reach a Mixer: the scaling every model applies, and the evaluation preprocessing a
preset or a training run records once for evaluation, export and serving to read.

No TensorFlow here: the arithmetic works on NumPy arrays and on any backend's tensors.
"""

import dataclasses

# The official pipeline maps uint8 pixels [0, 255] to [-1, 1]: x / 127.5 - 1.
PIXEL_SCALE = 1.0 / 127.5
PIXEL_OFFSET = -1.0

EVAL_RESIZE = ("crop", "resize")
INTERPOLATIONS = ("bilinear", "bicubic")

# The serving and prediction decode refuses images with more pixels than this (width x height from
# the header), before decoding: 40 megapixels (e.g. 8000 x 5000) decode to 120 MB of uint8 pixels.
# Without a bound, one 379 KB PNG declaring 20000 x 20000 pixels takes a server to 10 GB.
DEFAULT_MAX_PIXELS = 40_000_000


def pixel_normalization(pixel_mean=None, pixel_std=None):
    """(scale, offset) that map [0, 255] pixels to (pixels / 255 - mean) / std, timm's form of a
    weights' normalisation (mean and std per channel, in [0, 1] units). None for both, or the
    official mean 0.5 and std 0.5, is the official scaling to [-1, 1] (scalars, exactly as before);
    otherwise lists of 3. ValueError for a std that is not positive or a length other than 1 or 3."""
    if pixel_mean is None and pixel_std is None:
        return PIXEL_SCALE, PIXEL_OFFSET
    mean, std = _per_channel("pixel_mean", pixel_mean, 0.5), _per_channel("pixel_std", pixel_std, 0.5)
    if any(s <= 0 for s in std):
        raise ValueError(f"pixel_std must be positive in every channel, got {pixel_std!r}")
    if mean == (0.5,) * 3 and std == (0.5,) * 3:
        return PIXEL_SCALE, PIXEL_OFFSET
    return [1.0 / (255.0 * s) for s in std], [-m / s for m, s in zip(mean, std)]


def _per_channel(name, value, default):
    values = (default,) if value is None else tuple(value) if hasattr(value, "__len__") else (value,)
    if len(values) not in (1, 3) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a number or 3 numbers (R, G, B in [0, 1] units), got {value!r}")
    return tuple(float(v) for v in values) * (3 // len(values))


def scale_pixels(images):
    """[0, 255] -> [-1, 1]; `images` a float array or tensor."""
    return images * PIXEL_SCALE + PIXEL_OFFSET


@dataclasses.dataclass(frozen=True)
class EvalPreprocessing:
    """How an image of any size becomes the model's H x W input for evaluation and serving.

    eval_resize: "crop" resizes so the image covers size / crop_ratio (aspect kept) and takes the
        centred crop (the paper's 256 -> 224 at crop_ratio 0.875); "resize" squeezes the whole
        image to the size (right for a model trained on whole images, without random crops).
    crop_ratio: the crop's share of the resized image's side, in (0, 1]; "crop" only.
    interpolation: "bilinear" (the official pipeline's, and MIIL's) or "bicubic" (Google's
        ImageNet-21k weights as timm evaluates them).
    """

    eval_resize: str = "crop"
    crop_ratio: float = 0.875
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.eval_resize not in EVAL_RESIZE:
            raise ValueError(f"eval_resize must be one of {EVAL_RESIZE}, got {self.eval_resize!r}")
        if (
            isinstance(self.crop_ratio, bool)
            or not isinstance(self.crop_ratio, (int, float))
            or not 0 < self.crop_ratio <= 1
        ):
            raise ValueError(f"crop_ratio must be in (0, 1], got {self.crop_ratio!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")

    def to_dict(self):
        return dataclasses.asdict(self)

    def crop_range(self, side):
        """(ratio the centre crop takes, (lowest, highest) ratio taking that same crop) at an input
        of `side` px: the resized side is rounded to whole pixels, so on small inputs a band of
        ratios gives one crop (at 8 px every ratio from 0.842 to 0.941 takes 8 of 9 px)."""
        resized = max(side, round(side / self.crop_ratio))
        return side / resized, (side / (resized + 0.5), min(1.0, side / (resized - 0.5)))

    @classmethod
    def from_dict(cls, record):
        """From a recorded dict (a run, a preset, export metadata); missing fields take the defaults
        and other keys are ignored, so a whole metadata record can be passed."""
        record = record or {}
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls) if record.get(f.name) is not None})
