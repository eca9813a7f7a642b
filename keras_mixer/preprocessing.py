"""How pixels reach a Mixer: the scaling every model applies, and the evaluation preprocessing a
preset or a training run records once for evaluation, export and serving to read.

No TensorFlow here: the arithmetic works on NumPy arrays and on any backend's tensors.
"""

import dataclasses

# The official pipeline maps uint8 pixels [0, 255] to [-1, 1]: x / 127.5 - 1.
PIXEL_SCALE = 1.0 / 127.5
PIXEL_OFFSET = -1.0

EVAL_RESIZE = ("crop", "resize")


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
    """

    eval_resize: str = "crop"
    crop_ratio: float = 0.875

    def __post_init__(self):
        if self.eval_resize not in EVAL_RESIZE:
            raise ValueError(f"eval_resize must be one of {EVAL_RESIZE}, got {self.eval_resize!r}")
        if (
            isinstance(self.crop_ratio, bool)
            or not isinstance(self.crop_ratio, (int, float))
            or not 0 < self.crop_ratio <= 1
        ):
            raise ValueError(f"crop_ratio must be in (0, 1], got {self.crop_ratio!r}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record):
        """From a recorded dict (a run, a preset, export metadata); missing fields take the defaults
        and other keys are ignored, so a whole metadata record can be passed."""
        record = record or {}
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls) if record.get(f.name) is not None})
