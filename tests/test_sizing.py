"""A run sized to its data: the model, input size and length the small-images recipes leave open,
and their regularisation scaled to the run's length."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from runs import trainer

from keras_mixer.data import load_source
from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.training.config import TrainConfig, load_config
from keras_mixer.training.sizing import (
    fit_to_data,
    keep_decided,
    pick_epochs,
    pick_image_size,
    pick_model,
    scale_to_length,
)


def _folder(root, sides, classes=2, per_class=6):
    """ROOT/{train,test}/c<k>/<i>.png: grey PNGs whose (height, width) cycle through `sides`."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k in range(classes):
            folder = os.path.join(root, split, f"c{k}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                h, w = sides[i % len(sides)]
                Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(root)


@pytest.mark.parametrize(
    "side, images, classes, model, size",
    [
        (8, 1_437, 10, "T/2", 8),  # the digits: the demo's own model
        (25, 160, 2, "T/4", 24),  # face crops: rounded to the 4 px patch
        (28, 12_000, 10, "T/4", 28),  # MNIST
        (16, 3_072, 3, "T/4", 16),  # texture patches
        (500, 3_000, 5, "T/16", 224),  # photos: downscaled to the largest input
        (96, 100_000, 10, "S/16", 96),
        (64, 5_000, 200, "S/16", 64),  # many classes: wider
        (300, 1_281_167, 1000, "B/16", 224),  # ImageNet-sized
    ],
)
def test_the_model_and_size_follow_the_images(side, images, classes, model, size):
    assert pick_model(side, images, classes) == model
    patch = int(model.split("/")[1])
    assert pick_image_size(side, patch) == size
    assert (size // patch) >= 2 and size % patch == 0


def test_the_length_follows_the_number_of_images():
    assert pick_epochs(1_437) == 40 and pick_epochs(20_000) == 40
    assert pick_epochs(50_000) == 16  # the same number of steps' worth of passes as 20,000 images
    assert pick_epochs(1_281_167) == 10  # never fewer


def test_a_folder_measures_its_images_when_opened(tmp_path):
    root = _folder(tmp_path / "set", [(20, 30), (28, 28), (40, 26)])
    source = load_source(f"folder:{root}", "train")
    assert source.sides.tolist() == [20, 28, 26] * 4
    assert source.image_side() == 26
    unmeasured = load_source(f"folder:{root}", "train")
    unmeasured.sides = None  # read from the files instead
    assert unmeasured.image_side() == 26


def test_a_recipe_that_leaves_them_open_gets_them_from_the_data(tmp_path):
    root = _folder(tmp_path / "set", [(28, 28)])
    source = load_source(f"folder:{root}", "train")
    config = load_config("small_images", dataset=f"folder:{root}")
    sized, line = fit_to_data(config, source)
    assert (sized.model, sized.image_size, sized.epochs) == ("T/4", 28, 40)
    assert "12 training images in 2 classes, median shorter side 28 px" in line
    assert "T/4 at 28 px (7x7 tokens of 4 px), 40 epochs; --model, --image_size, --epochs override" in line
    # A flag given keeps its value; the rest follows from it.
    given = load_config("small_images", dataset=f"folder:{root}", model="T/2", steps=5)
    sized, line = fit_to_data(given, source)
    assert (sized.model, sized.image_size, sized.epochs, sized.steps) == ("T/2", 28, None, 5)
    assert line.endswith("T/2 at 28 px (14x14 tokens of 2 px); --image_size override")
    # A recipe that names its model and size keeps them.
    named = load_config("imagenet1k_b16", dataset=f"folder:{root}")
    assert fit_to_data(named, source) == (named, None)


def test_a_short_run_scales_the_regularisation_down():
    recipe = dict(crop_area_min=0.7, drop_path=0.1, crop_ratio=0.92, eval_resize="crop", warmup_steps=100)
    config = TrainConfig(full_strength_epochs=40, epochs=3, **recipe)
    short, line = scale_to_length(config, total_steps=3 * 187, steps_per_epoch=187)
    share = 3 / 40
    assert short.crop_area_min == pytest.approx(1 - 0.3 * share, abs=1e-4)
    assert short.drop_path == pytest.approx(0.1 * share, abs=1e-4)
    assert short.crop_ratio == pytest.approx(1 - 0.08 * share, abs=1e-4)
    assert short.eval_resize == "crop" and short.warmup_steps == 57  # a tenth of 561 steps, rounded up
    assert line.startswith("A 3-epoch run of a recipe set for 40 epochs: crop_area_min 0.9775, drop_path 0.0075")
    # A run of full length is the recipe as written, even where its warmup is most of the run.
    for total, per_epoch in ((40 * 187, 187), (880, 22), (80, 2)):
        full, line = scale_to_length(dataclass_with(config, epochs=40), total_steps=total, steps_per_epoch=per_epoch)
        assert full == dataclass_with(config, epochs=40) and line is None
    # Flags given on the command line stay as given; a recipe without full_strength_epochs is not scaled.
    kept, _ = scale_to_length(dataclass_with(config, flags_given=("drop_path",)), 561, 187)
    assert kept.drop_path == 0.1 and kept.crop_area_min < 1
    assert scale_to_length(TrainConfig(epochs=3, **recipe), 561, 187) == (TrainConfig(epochs=3, **recipe), None)
    # No crops left: evaluation takes whole images.
    none, _ = scale_to_length(dataclass_with(config, crop_area_min=1.0, crop_ratio=1.0), 561, 187)
    assert none.eval_resize == "resize"


def dataclass_with(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_the_trainer_sizes_itself_and_resumes_with_what_it_picked(tmp_path):
    root = _folder(tmp_path / "set", [(20, 20)], per_class=8)
    workdir = str(tmp_path / "run")
    args = ["--dataset", f"folder:{root}", "--epochs", "2", "--workdir", workdir, "--noexport", "--seed", "0"]
    first = trainer("pretrain", *args)
    sized = "Sized to the data (16 training images in 2 classes, median shorter side 20 px): T/4 at 20 px"
    assert sized in first.stdout
    assert "A 2-epoch run of a recipe set for 40 epochs" in first.stdout
    with open(os.path.join(workdir, "run.json")) as f:
        used = json.load(f)["config"]
    assert (used["model"], used["image_size"], used["epochs"]) == ("T/4", 20, 2)
    assert used["crop_area_min"] == pytest.approx(0.985) and used["warmup_steps"] == 1
    again = trainer("pretrain", *args)  # the same command: the same sizes, so no recipe change
    assert "already finished" in again.stdout


def test_the_crop_a_ratio_takes_on_a_small_input_is_said():
    # At 8 px the resized side is 9 px for every ratio from 8 / 9.5 to 8 / 8.5.
    taken, (low, high) = EvalPreprocessing("crop", 0.92).crop_range(8)
    assert taken == pytest.approx(8 / 9) and (low, high) == (
        pytest.approx(0.8421, abs=1e-4),
        pytest.approx(0.9412, abs=1e-4),
    )
    assert EvalPreprocessing("crop", 0.875).crop_range(224)[0] == 0.875  # 256 px: exact
    assert EvalPreprocessing("crop", 0.99).crop_range(8)[1][1] == 1.0


def test_one_skipped_file_reads_in_the_singular(tmp_path):
    root = _folder(tmp_path / "set", [(8, 8)])
    (tmp_path / "set" / "train" / "c0" / "notes.txt").write_text("x")
    line = load_source(f"folder:{root}", "train").describe_problems()
    assert "left out 1 file without an image extension (" in line


def test_a_resumed_run_keeps_what_its_start_decided():
    recorded = dict(model="T/4", image_size=20, epochs=2, steps=None, crop_area_min=0.985, drop_path=0.005)
    recorded.update(crop_ratio=0.996, eval_resize="crop", warmup_steps=1)
    longer = load_config("small_images", dataset="digits", steps=80, crop_area_min=1.0)  # the flags given now
    kept = keep_decided(longer, recorded)
    assert (kept.model, kept.image_size, kept.epochs, kept.steps) == ("T/4", 20, None, 80)
    assert (kept.crop_area_min, kept.drop_path, kept.crop_ratio, kept.warmup_steps) == (1.0, 0.005, 0.996, 1)
    # A recipe that decides nothing keeps what it says.
    named = load_config("imagenet1k_b16", dataset="digits")
    assert keep_decided(named, dict(recorded, model="S/16", crop_area_min=0.5)) == named
