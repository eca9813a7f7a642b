"""A run sized to its data: the model, input size and length a recipe leaves open, and the
regularisation a short run can afford.

Two steps, both done once the training split is open (its images were read once to check them,
which also measured them) and before the recipe check of a resumed run, so that run.json records
the values the run used:

- `fit_to_data`: a `TrainConfig` whose `model`, `image_size` or length (`epochs` and `steps`) is
  None (the small-images recipes) gets them from the data: the images' median shorter side, the
  number of training images and of classes (`pick_model`, `pick_image_size`, `pick_epochs`).
- `keep_decided`: a resumed run keeps what its start decided (run.json), so that changing one
  field (its length, say) changes nothing else.
- `scale_to_length`: a recipe with `full_strength_epochs` set its crops, stochastic depth and
  evaluation crop for a run that long; a shorter run scales each toward none by
  epochs / full_strength_epochs, so a short budget is not spent on regularisation it cannot use,
  and warms up for at most a tenth of its steps. A run of full length is the recipe as written.
  Fields given on the command line are kept as given.
"""

import dataclasses
import math

from keras_mixer.model.variants import variant_config

# The largest input the sizing picks: images above it are downscaled (the paper's 224).
LARGEST_INPUT = 224
# Up to this many training images a run gets the recipe's full 40 epochs; above, fewer (a large set
# needs fewer passes), never under `FEWEST_EPOCHS`.
FULL_LENGTH_IMAGES = 20_000
FULL_LENGTH_EPOCHS = 40
FEWEST_EPOCHS = 10
# Warmup takes at most this share of a run.
WARMUP_SHARE = 0.1
# The fields `scale_to_length` scales, and what each is at no regularisation.
SCALED = dict(crop_area_min=1.0, drop_path=0.0, crop_ratio=1.0)


def keep_decided(config, recorded):
    """A resumed run's config with what its start decided (`recorded`, run.json's recipe) for the
    fields the data and the length decide, except those the command line sets now: a run is sized
    and scaled once, so extending it (`--steps 80 --accept_changes steps`) changes only what it
    names."""
    given = config.flags_given
    keep = {}
    for name in ("model", "image_size", "epochs"):
        opened = getattr(config, name) is None and (name != "epochs" or config.steps is None)
        length_given = name == "epochs" and {"epochs", "steps"} & set(given)
        if opened and not length_given and name in recorded:
            keep[name] = recorded[name]
    if config.full_strength_epochs:
        for name in (*SCALED, "eval_resize", "warmup_steps"):
            if name not in given and name in recorded:
                keep[name] = recorded[name]
    return dataclasses.replace(config, **keep)


def pick_model(side, images, classes):
    """The variant for images of `side` px (median shorter side), `images` training images and
    `classes` classes: patches that make a token grid of about 4x4 to 8x8 (2 px below 16 px, 4 px
    below 64 px, else 16 px at an input of at most 224 px); at 16 px patches, width grows with the
    data (T/16 for a few thousand images, S/16 from 20,000 images or over 100 classes, B/16 from
    500,000 images)."""
    if side < 16:
        return "T/2"
    if side < 64:
        return "T/4"
    if images >= 500_000:
        return "B/16"
    if images >= FULL_LENGTH_IMAGES or classes > 100:
        return "S/16"
    return "T/16"


def pick_image_size(side, patch):
    """`side` rounded to the nearest multiple of `patch` (at least two patches; at most
    `LARGEST_INPUT` px): no pixels invented by upsampling beyond half a patch."""
    return min(max(2 * patch, patch * round(side / patch)), patch * (LARGEST_INPUT // patch))


def pick_epochs(images):
    """40 epochs up to 20,000 images; a larger set the same number of steps' worth of passes
    (40 x 20,000 / images), at least 10."""
    if images <= FULL_LENGTH_IMAGES:
        return FULL_LENGTH_EPOCHS
    return max(FEWEST_EPOCHS, round(FULL_LENGTH_EPOCHS * FULL_LENGTH_IMAGES / images))


def fit_to_data(config, source):
    """(config with `model`, `image_size` and `epochs` filled in where they are None, one line
    saying what was picked and why; None when nothing was open)."""
    open_fields = [
        name
        for name, unset in (
            ("model", config.model is None and config.mode == "pretrain"),
            ("image_size", config.image_size is None),
            ("epochs", config.epochs is None and config.steps is None),
        )
        if unset
    ]
    if not open_fields:
        return config, None
    if config.mode == "finetune" and "image_size" in open_fields:
        # Fine-tuning keeps the weights' own input size unless --image_size asks for another.
        from keras_mixer.weights_io import loader

        trained = loader.open_weights(config.init).trained_on.image_size
        if trained is None:
            raise ValueError(f"--init {config.init!r} does not record its input size: give --image_size")
        config = dataclasses.replace(config, image_size=int(trained[0]))
        open_fields.remove("image_size")
        if not open_fields:
            return config, None
    images, classes = source.num_examples, source.num_classes
    side = source.image_side()
    if side is None and ("model" in open_fields or "image_size" in open_fields):
        raise ValueError(f"the images of {config.dataset!r} have no one size to read: give --model and --image_size")
    if images is None and "epochs" in open_fields:
        raise ValueError(f"the size of {config.dataset!r} is unknown: give --steps")
    picked = {}
    if "model" in open_fields:
        picked["model"] = pick_model(side if config.image_size is None else config.image_size, images, classes)
    model = picked.get("model", config.model)
    if "image_size" in open_fields:
        picked["image_size"] = pick_image_size(side, _patch(model))
    if "epochs" in open_fields:
        picked["epochs"] = pick_epochs(images)
    config = dataclasses.replace(config, **picked)
    why = [f"{images:,} training images in {classes} classes"]
    if side is not None:
        why.append(f"median shorter side {side} px")
    size, patch = config.image_size, _patch(config.model)
    choice = [f"{config.model} at {size} px ({size // patch}x{size // patch} tokens of {patch} px)"]
    if "epochs" in picked:
        choice.append(f"{config.epochs:g} epochs")
    flags = ", ".join(f"--{name}" for name in picked)
    line = f"Sized to the data ({', '.join(why)}): {', '.join(choice)}; {flags} override"
    return config, line


def _patch(model):
    return variant_config(model)["patch_size"]


def scale_to_length(config, total_steps, steps_per_epoch):
    """(config with its regularisation scaled to the run's length, one line saying so; None when
    nothing changed). The fields the command line set (`config.flags_given`) are kept."""
    given, changes = config.flags_given, {}
    if config.full_strength_epochs:
        share = min(1.0, total_steps / steps_per_epoch / config.full_strength_epochs)
        for name, none in SCALED.items():
            if name not in given:
                value = round(none + (getattr(config, name) - none) * share, 4)
                if value != getattr(config, name):
                    changes[name] = value
        if "eval_resize" not in given and changes.get("crop_ratio", config.crop_ratio) >= 1:
            changes["eval_resize"] = "resize"  # no training crops left: evaluate whole images
        longest = max(1, math.ceil(WARMUP_SHARE * total_steps))
        if share < 1 and "warmup_steps" not in given and config.warmup_steps > longest:
            changes["warmup_steps"] = longest
    if not changes:
        return config, None
    parts = []
    scaled = ", ".join(f"{name} {value!r}" for name, value in changes.items() if name != "warmup_steps")
    if scaled:
        epochs = total_steps / steps_per_epoch
        parts.append(
            f"A {epochs:.3g}-epoch run of a recipe set for {config.full_strength_epochs:g} epochs: {scaled} "
            f"(regularisation scaled to the run's length; flags given are kept)"
        )
    if "warmup_steps" in changes:
        parts.append(f"warmup {changes['warmup_steps']} of the run's {total_steps} steps (a tenth at most)")
    line = "; ".join(parts)
    return dataclasses.replace(config, **changes), line[0].upper() + line[1:]
