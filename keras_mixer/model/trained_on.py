"""What a model was trained on: the one record that evaluation, export and serving read back.

Written in one form everywhere a model goes: a training run's run.json ("about"), its model.keras
(a `keras_mixer.json` member), a TF Serving export (`assets.extra/keras_mixer.json`, with the
serving settings beside it) and a preset's metadata. Read back by `TrainedOn.from_dict`, which
also takes the older spellings (a version 0.1 run.json kept the data set in its recipe and the
class names at the top level), so old files keep loading.

No Keras here: the record is plain data.
"""

import dataclasses
from typing import Optional

from keras_mixer.model.pixels import EvalPreprocessing


@dataclasses.dataclass(frozen=True)
class TrainedOn:
    """dataset: a TFDS name, folder:PATH or digits; None when unknown (weights without a record).
    class_names: the labels in class order, or None.
    preprocessing: how an image becomes the model's input for evaluation and serving.
    model: the variant name it was built as ("B/16"), or None.
    image_size: its input (height, width) in pixels, or None.
    step: the training step the weights are from, or None.
    pixel_mean, pixel_std: the pixel normalisation the weights were trained with (timm's form,
        (pixels / 255 - mean) / std), which the model applies inside; None: the official [-1, 1].
    """

    dataset: Optional[str] = None
    class_names: Optional[tuple] = None
    preprocessing: EvalPreprocessing = EvalPreprocessing()
    model: Optional[str] = None
    image_size: Optional[tuple] = None
    step: Optional[int] = None
    pixel_mean: Optional[tuple] = None
    pixel_std: Optional[tuple] = None

    def __post_init__(self):
        if self.class_names is not None:  # a list from JSON: kept as a tuple, so the record is hashable
            object.__setattr__(self, "class_names", tuple(str(name) for name in self.class_names))
        for name in ("pixel_mean", "pixel_std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(
                    self, name, tuple(float(v) for v in (value if hasattr(value, "__len__") else [value]))
                )
        if self.image_size is not None:  # 224, [224, 224] (JSON) or (224, 224)
            size = self.image_size
            object.__setattr__(
                self, "image_size", tuple(int(s) for s in (size if hasattr(size, "__len__") else (size, size)))
            )

    def to_dict(self):
        """The JSON form: flat, the preprocessing's fields beside the others; unknowns left out."""
        fields = dict(dataset=self.dataset, model=self.model, step=self.step)
        fields["class_names"] = None if self.class_names is None else list(self.class_names)
        fields["image_size"] = None if self.image_size is None else list(self.image_size)
        for name in ("pixel_mean", "pixel_std"):
            fields[name] = None if getattr(self, name) is None else list(getattr(self, name))
        return {**{k: v for k, v in fields.items() if v is not None}, **self.preprocessing.to_dict()}

    @classmethod
    def from_dict(cls, record):
        """From any recorded form: a `to_dict` (other keys, such as an export's serving settings, are
        ignored), a version 0.1 run.json, or None/{} (nothing known: the defaults)."""
        record = dict(record or {})
        if "about" in record:  # a whole run.json
            return cls.from_dict(record["about"])
        if "config" in record:  # a version 0.1 run.json: no "about", the recipe and the class names
            recipe = record["config"]
            record = dict(recipe, class_names=record.get("class_names"))
        return cls(
            dataset=record.get("dataset"),
            class_names=record.get("class_names"),
            preprocessing=EvalPreprocessing.from_dict(record),
            model=record.get("model"),
            image_size=record.get("image_size"),
            step=record.get("step"),
            pixel_mean=record.get("pixel_mean"),
            pixel_std=record.get("pixel_std"),
        )

    def replace(self, **changes):
        """A copy with `changes` (field: value) made."""
        return dataclasses.replace(self, **changes)
