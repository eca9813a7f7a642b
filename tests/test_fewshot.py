"""The linear few-shot probe: the closed-form solver, the draws, the features, the command and the
probe during training."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import randomize, tiny_mixer
from runs import assert_one_line_error, metrics, trainer

from keras_mixer import data
from keras_mixer.model.trained_on import TrainedOn
from keras_mixer.serving.trained_models import load_keras_model
from keras_mixer.training import fewshot as fs
from keras_mixer.weights_io.official_keys import save_keras

# --- the solver --------------------------------------------------------------------------------------


def _clusters(rng, num_classes, per_class, dim, spread=5.0, noise=0.05):
    """Features [num_classes * per_class, dim] around class means far apart, and their labels."""
    means = rng.normal(0, spread, (num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    return means[labels] + rng.normal(0, noise, (len(labels), dim)), labels


@pytest.mark.parametrize("shots", [1, 30])  # n = 6 or 180 shots against 48 dimensions: dual and primal
def test_probe_is_perfect_on_well_separated_classes(shots):
    rng = np.random.default_rng(0)
    train_x, train_y = _clusters(rng, 6, 40, 48)
    test_x, test_y = train_x + rng.normal(0, 0.05, train_x.shape), train_y  # fresh noise around the same means
    results = fs.fewshot(train_x, train_y, test_x, test_y, 6, shots=[shots], draws=4, seed=1)
    assert results[shots]["accuracies"] == [1.0] * 4
    assert results[shots]["mean"] == results[shots]["min"] == results[shots]["max"] == 1.0


@pytest.mark.parametrize("n, dim", [(12, 40), (90, 16)])
def test_fit_probe_solves_the_regularised_least_squares_problem(n, dim):
    """The stationarity conditions of min ||Z w + 1 c - T||^2 + l2 ||w||^2 over (w, c), with Z the
    standardised features and T the {-1, +1} targets, hold for the returned (W, b)."""
    rng = np.random.default_rng(n)
    x = rng.normal(3, 1, (n, dim)) * rng.uniform(0.1, 20, dim)
    y = np.arange(n) % 4
    l2 = 7.0
    weights, bias = fs.fit_probe(x, y, 4, l2)
    mean, std = x.mean(axis=0), x.std(axis=0) + fs.STD_EPSILON
    z = (x - mean) / std
    w = weights * std[:, None]  # the same scores on standardised features
    c = bias + mean @ weights
    np.testing.assert_allclose(z @ w + c, x @ weights + bias, atol=1e-9)
    targets = np.where(np.eye(4)[y] > 0, 1.0, -1.0)
    residual = z @ w + c - targets
    np.testing.assert_allclose(z.T @ residual + l2 * w, 0, atol=1e-8)  # d/dw
    np.testing.assert_allclose(residual.sum(axis=0), 0, atol=1e-8)  # d/dc: the bias is not penalised
    with pytest.raises(ValueError, match="l2 must be positive, got 0"):
        fs.fit_probe(x, y, 4, 0.0)


def test_predictions_do_not_depend_on_the_feature_scale():
    # Standardisation by the shots' statistics: per-dimension scales and offsets change nothing (up
    # to the small constant added to the standard deviation).
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 30)), np.arange(20) % 5
    test = rng.normal(size=(50, 30))
    scale, shift = rng.uniform(0.5, 100, 30), rng.normal(0, 50, 30)
    w1, b1 = fs.fit_probe(x, y, 5)
    w2, b2 = fs.fit_probe(x * scale + shift, y, 5)
    np.testing.assert_allclose(test @ w1 + b1, (test * scale + shift) @ w2 + b2, rtol=1e-4, atol=1e-4)


def test_draws_are_nested_reproducible_per_class_and_leave_the_global_rng_alone():
    labels = np.array([0, 1, 2] * 10 + [1, 2] * 5)
    state = np.random.get_state()
    drawn = fs.draw_shots(labels, 3, 4, draws=5, seed=3)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the training RNG is not consumed
    assert drawn.shape == (5, 3, 4)
    assert np.array_equal(drawn, fs.draw_shots(labels, 3, 4, draws=5, seed=3))
    assert not np.array_equal(drawn, fs.draw_shots(labels, 3, 4, draws=5, seed=4))
    for draw in drawn:
        for c in range(3):
            assert (labels[draw[c]] == c).all() and len(set(draw[c])) == 4
    assert len({tuple(d.ravel()) for d in drawn}) > 1  # the draws differ from each other


def test_too_many_shots_name_k_and_the_smallest_class():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 7)
    with pytest.raises(ValueError, match=r"4 shots per class.*smallest class of the training set \(label 1\) has 3"):
        fs.draw_shots(labels, 3, 4, draws=1, seed=0)


@pytest.mark.parametrize("value", ["0", "a", "1,,5", "", "-3"])
def test_bad_shots_are_refused_naming_the_value(value):
    with pytest.raises(ValueError, match=f"--shots must be a comma list of positive integers.*got {value!r}"):
        fs.parse_shots(value, "--shots")


def test_parse_shots_sorts_and_deduplicates():
    assert fs.parse_shots("25, 1,5,5") == (1, 5, 25)
    assert fs.parse_shots([10, 1]) == (1, 10)


# --- features ----------------------------------------------------------------------------------------


def test_prelogits_are_the_head_input_also_without_the_top(images):
    model = randomize(tiny_mixer())
    features = np.asarray(fs.features_function(model)(images))
    assert features.shape == (3, 24)
    head = model.get_layer("head")
    np.testing.assert_allclose(features @ head.kernel.numpy() + head.bias.numpy(), model(images), rtol=1e-5, atol=1e-5)
    for pooling in (None, "max"):  # a backbone gives the same pre-logits, whatever its own pooling
        backbone = tiny_mixer(include_top=False, pooling=pooling)
        backbone.set_weights(model.get_weights()[:-2])  # all but the head's kernel and bias
        np.testing.assert_allclose(fs.features_function(backbone)(images), features, rtol=1e-5, atol=1e-6)


def test_subset_reads_only_the_chosen_examples_in_split_order():
    train = data.load_source("digits", "train")
    labels = train.labels()
    assert len(labels) == train.num_examples
    chosen = train.subset([900, 2, 5])
    assert chosen.num_examples == 3
    assert np.array_equal(chosen.labels(), labels[[2, 5, 900]])
    images = np.stack([image for image, _ in train.dataset().as_numpy_iterator()])
    picked = np.stack([image for image, _ in chosen.dataset().as_numpy_iterator()])
    np.testing.assert_array_equal(picked, images[[2, 5, 900]])
    with pytest.raises(ValueError, match=r"positions of digits split 'train' must be in 0 \.\. 1437 - 1, got -1"):
        train.subset([-1, 3])


@pytest.mark.slow
def test_demo_features_beat_chance_by_far(demo):
    workdir, _, _ = demo
    model, trained_on = load_keras_model(os.path.join(workdir, "model.keras"))
    train, test = data.load_source("digits", "train"), data.load_source("digits", "test")
    probe = fs.FewshotProbe(train, test, [1, 5], (8, 8), trained_on.preprocessing, 256, draws=3)
    results = probe(fs.features_function(model))
    assert probe.feature_dim == model.get_layer("head").kernel.shape[0]
    assert results[5]["mean"] > 0.5  # chance is 0.1
    assert min(results[1]["accuracies"]) > 0.2


# --- the command -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fewshot_command_writes_its_numbers_and_picture(demo, tmp_path):
    workdir, _, _ = demo
    result = trainer("fewshot", "--source", workdir, "--shots", "5,1", "--draws", 3, "--out", tmp_path / "out")
    with open(tmp_path / "out" / "fewshot.json") as f:
        report = json.load(f)
    with open(os.path.join(workdir, "run.json")) as f:
        hidden_dim = json.load(f)["architecture"]["hidden_dim"]
    assert report["dataset"] == "digits" and report["eval_split"] == "test"  # recorded by the workdir
    assert report["source"] == str(workdir) and report["feature_dim"] == hidden_dim
    assert report["shots"] == [1, 5] and report["draws"] == 3 and report["l2"] == fs.L2 and report["seed"] == 0
    assert report["chance"] == pytest.approx(1 / report["num_classes"]) and report["eval_examples"] == 360
    for k in ("1", "5"):
        r = report["results"][k]
        assert len(r["accuracies"]) == 3
        assert r["mean"] == pytest.approx(np.mean(r["accuracies"])) and r["std"] == pytest.approx(
            np.std(r["accuracies"])
        )
        assert r["min"] == min(r["accuracies"]) <= r["mean"] <= r["max"] == max(r["accuracies"])
        assert f"{r['mean']:.4f} ± {r['std']:.4f}" in result.stdout  # the printed table
    assert report["results"]["5"]["mean"] > 0.5
    picture = tmp_path / "out" / "fewshot.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(picture).shape
    assert height > 200 and width > 200
    assert not glob.glob(str(tmp_path / "out" / ".tmp-*"))  # written atomically, nothing left over


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--shots", "0"], ["--shots", "'0'", "positive integers"]),
        (["--shots", "1000"], ["1000 shots", "smallest class of digits/train"]),
        (["--dataset", "no_such_dataset_xyz"], ["no_such_dataset_xyz"]),
        (["--source", "{tmp}/missing.keras"], ["missing.keras"]),
    ],
)
def test_fewshot_command_errors_are_one_line(tmp_path, args, fragments):
    # An untrained digits-sized model is enough: each error comes before any feature is computed.
    model_path = str(tmp_path / "model.keras")
    record = TrainedOn("digits", [str(d) for d in range(10)], image_size=8)
    save_keras(tiny_mixer(input_shape=(8, 8, 3), classes=10), model_path, record.to_dict())
    args = [a.format(tmp=tmp_path) for a in args]
    source = [] if "--source" in args else ["--source", model_path]
    result = trainer("fewshot", *source, *args, "--out", tmp_path / "out", check=False)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out" / "fewshot.json").exists()


# --- during training ---------------------------------------------------------------------------------


def _weights(workdir):
    import keras

    return keras.saving.load_model(os.path.join(workdir, "model.keras")).get_weights()


@pytest.mark.slow
def test_training_probes_report_and_leave_the_training_unchanged(tmp_path):
    common = ["--steps", 30, "--log_every", 10, "--noexport"]
    probed = trainer("pretrain", *common, "--fewshot_every", 10, "--fewshot_shots", "5,1", "--workdir", tmp_path / "a")
    trainer("pretrain", *common, "--workdir", tmp_path / "b")
    for a, b in zip(_weights(tmp_path / "a"), _weights(tmp_path / "b")):
        np.testing.assert_array_equal(a, b)  # the probes consumed no training randomness or data

    m = metrics(tmp_path / "a")
    assert m["fewshot"]["step"] == 30 and set(m["fewshot"]) == {"step", "1shot", "5shot"}
    assert m["fewshot"]["5shot"] > 0.3  # chance is 0.1
    assert metrics(tmp_path / "b")["fewshot"] is None
    points = {}
    for event_file in glob.glob(str(tmp_path / "a" / "tensorboard" / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            for value in event.summary.value:
                if value.tag.startswith("fewshot/"):
                    points.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    assert set(points) == {"fewshot/1shot", "fewshot/5shot"}
    assert sorted(points["fewshot/5shot"]) == [10, 20, 30]  # every 10 steps, the last one at the end
    assert points["fewshot/5shot"][30] == pytest.approx(m["fewshot"]["5shot"])
    assert "few-shot top-1" in probed.stderr + probed.stdout


def test_training_probe_settings_are_checked():
    from keras_mixer.training import TrainConfig

    with pytest.raises(ValueError, match="fewshot_every must be 0 .* got -1"):
        TrainConfig(steps=5, fewshot_every=-1).validate()
    for shots in ((), (0, 5), ("1",), [True]):
        with pytest.raises(ValueError, match="fewshot_shots must be a non-empty list of positive integers"):
            TrainConfig(steps=5, fewshot_every=10, fewshot_shots=shots).validate()
    TrainConfig(steps=5, fewshot_every=10, fewshot_shots=[1, 5]).validate()  # a recipe's list is fine
    # Operational: a resumed run may switch the probes on or off without --accept_changes.
    import dataclasses

    from keras_mixer.training.config import recipe_changes

    recorded = dataclasses.asdict(TrainConfig(steps=5))
    assert recipe_changes(recorded, TrainConfig(steps=5, fewshot_every=5, fewshot_shots=(2,))) == []
    assert recipe_changes(recorded, TrainConfig(steps=6))  # a computation field still counts


def test_training_probe_with_too_many_shots_stops_before_training(tmp_path):
    args = ["--steps", 5, "--fewshot_every", 10, "--fewshot_shots", "1,200", "--workdir", tmp_path]
    assert_one_line_error(trainer("pretrain", *args, check=False), "200 shots", "smallest class")
    assert not (tmp_path / "checkpoints").exists()
