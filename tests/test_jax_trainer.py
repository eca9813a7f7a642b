"""The trainers on Keras' JAX backend: the same programs, outputs and guarantees as on TensorFlow.

This test process runs Keras on TensorFlow; every JAX run is a subprocess with KERAS_BACKEND=jax
(two CPU devices through XLA_FLAGS where said). The fault guarantees on JAX are tested in
tests/test_jax_trainer_faults.py, a file of its own so that the suite's two processes share the runs.
"""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from runs import ENV, JAX, ROOT, assert_one_line_error, metrics, trainer
from test_faults import history_steps, strict_load

from keras_mixer.training.config import load_config
from keras_mixer.training.jax.engine import check_jax_fields

TWO_DEVICES = {**JAX, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def jax_trainer(program, *args, env=JAX, **kwargs):
    return trainer(program, *args, env=env, **kwargs)


def _popen(args, env=JAX, **kwargs):
    command = [sys.executable, os.path.join(ROOT, "trainers", "pretrain.py"), *map(str, args)]
    return subprocess.Popen(command, env={**ENV, **env}, cwd=ROOT, **kwargs)


@pytest.fixture(scope="module")
def tf_run(tmp_path_factory):
    """A finished 20-step demo run on the TensorFlow backend (its model.keras starts the runs below)."""
    workdir = tmp_path_factory.mktemp("tf_run") / "run"
    trainer("pretrain", "--steps", 20, "--log_every", 20, "--checkpoint_every", 20, "--workdir", workdir)
    return workdir


@pytest.fixture(scope="module")
def jax_demo(tmp_path_factory):
    """`KERAS_BACKEND=jax python trainers/pretrain.py`, the demo recipe with only the workdir moved:
    (workdir, the finished program). One run for the accuracy, the outputs and the cross-backend tests."""
    workdir = tmp_path_factory.mktemp("jax_demo") / "run"
    return workdir, jax_trainer("pretrain", "--workdir", workdir)


def _weights(workdir):
    return keras.saving.load_model(os.path.join(workdir, "model.keras")).get_weights()


# --- the same program, said plainly ----------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("strategy", "mirrored", "--strategy mirrored is a tf.distribute strategy"),
        ("tpu", "my-tpu", "--tpu my-tpu: on Keras' JAX backend"),
        ("xla", "off", "XLA compiles every step"),
        ("mixed_precision", "float16", "use bfloat16"),
    ],
)
def test_flags_that_mean_nothing_on_jax_are_refused_with_the_reason(field, value, message):
    config = load_config("demo", **{field: value}).validate()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_jax_fields(config)
    for fine in (dict(strategy="auto"), dict(tpu="local"), dict(xla="on"), dict(mixed_precision="bfloat16")):
        check_jax_fields(load_config("demo", **fine).validate())


@pytest.mark.slow
def test_a_tf_only_flag_stops_the_jax_trainer_in_one_line_before_writing(tmp_path):
    result = jax_trainer("pretrain", "--strategy", "mirrored", "--workdir", tmp_path / "run", check=False)
    assert_one_line_error(result, "--strategy mirrored", "leave --strategy unset")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_jax_run_writes_what_a_tf_run_writes_and_each_backend_reads_the_other(jax_demo, tf_run, tmp_path):
    workdir, result = jax_demo
    assert "Keras on jax, DataParallel over 1 device(s) on 1 host(s): cpu:0" in result.stdout
    m = strict_load(workdir / "metrics.json")
    assert set(m) == set(strict_load(tf_run / "metrics.json"))  # the same fields
    assert m["finished"] and m["step"] == 880 and m["strategy"] == "jax data-parallel" and m["replicas"] == 1
    assert history_steps(workdir) == list(range(20, 881, 20))  # the demo's log_every
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["600", "800", "880"]  # every 200, the 3 newest
    assert os.path.isfile(workdir / "export" / "880" / "saved_model.pb")
    assert json.loads((workdir / "run.json").read_text())["about"]["class_names"] == [str(i) for i in range(10)]

    # The export (written by TensorFlow in a child process) and model.keras score on TensorFlow as the
    # JAX run scored itself; a TF run's model.keras scores on JAX as it did on TF. Float sums in another
    # order may move a borderline image: within one of the 360.
    def evaluate(source, env=None):
        out = trainer("evaluate", "--source", source, env=env).stdout
        return float(out.split("top-1: ")[1].split()[0])

    for source in (workdir / "export", workdir / "model.keras", workdir):
        assert abs(evaluate(source) - m["eval_top1"]) <= 1 / 360 + 1e-9, source
    assert abs(evaluate(tf_run / "model.keras", JAX) - metrics(tf_run)["eval_top1"]) <= 1 / 360 + 1e-9
    refused = trainer("evaluate", "--source", tf_run / "export", env=JAX, check=False)
    assert_one_line_error(refused, "is a SavedModel", "KERAS_BACKEND=tensorflow")

    # The export program on JAX runs itself again on TensorFlow.
    exported = trainer("export", "--source", workdir / "model.keras", "--export_base", tmp_path / "e", env=JAX)
    assert "Exporting on Keras' tensorflow backend" in exported.stdout
    assert os.path.isfile(tmp_path / "e" / "1" / "saved_model.pb")  # the next free version


@pytest.mark.slow
def test_a_workdir_resumes_only_on_the_backend_that_wrote_its_checkpoints(tf_run, jax_demo, tmp_path):
    jax_workdir = tmp_path / "jax"
    shutil.copytree(jax_demo[0], jax_workdir)
    for run, wrote, other in ((tf_run, "tensorflow", JAX), (jax_workdir, "jax", {"KERAS_BACKEND": "tensorflow"})):
        more = ["--steps", 1000, "--accept_changes", "steps"]
        result = trainer("pretrain", *more, "--workdir", run, env=other, check=False)
        assert_one_line_error(result, f"written on Keras' {wrote} backend", f"resume with KERAS_BACKEND={wrote}")


# --- equivalence -------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_first_20_losses_on_jax_equal_tensorflows(tf_run, tmp_path):
    """The demo recipe (AdamW, warmup, clipping, mixup-free flips and crops in tf.data) from the same
    weights, seed and batches. Stochastic depth and dropout are off: each backend draws its own random
    numbers. Tolerance: float32, with oneDNN on TensorFlow and XLA on JAX summing in other orders
    (relative ~1e-6 per step), which 20 Adam steps grow; measured here 2e-5 at most."""
    args = ["--config", "demo", "--init", tf_run / "model.keras", "--steps", 20, "--log_every", 1, "--seed", 1]
    args += ["--drop_path", 0, "--dropout", 0, "--noexport"]
    trainer("finetune", *args, "--workdir", tmp_path / "tf")
    jax_trainer("finetune", *args, "--workdir", tmp_path / "jax")
    tf_losses = np.array(metrics(tmp_path / "tf")["loss_history"])
    jax_losses = np.array(metrics(tmp_path / "jax")["loss_history"])
    assert tf_losses.shape == jax_losses.shape == (20, 2)
    np.testing.assert_array_equal(tf_losses[:, 0], np.arange(1, 21))
    np.testing.assert_allclose(jax_losses[:, 1], tf_losses[:, 1], rtol=2e-4)
    assert tf_losses[-1, 1] < tf_losses[0, 1]  # it trains: the losses compared are not a flat line


@pytest.mark.slow
def test_two_devices_take_the_same_steps_as_one(tmp_path):
    """Stochastic depth on: the RNG states are replicated, so both draw the same masks."""
    args = ["--steps", 10, "--log_every", 1, "--checkpoint_every", 10, "--noexport"]
    one = jax_trainer("pretrain", *args, "--workdir", tmp_path / "one")
    two = jax_trainer("pretrain", *args, "--workdir", tmp_path / "two", env=TWO_DEVICES)
    assert "DataParallel over 1 device(s)" in one.stdout and "DataParallel over 2 device(s)" in two.stdout
    assert metrics(tmp_path / "two")["replicas"] == 2
    losses = [np.array(metrics(tmp_path / name)["loss_history"])[:, 1] for name in ("one", "two")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    for a, b in zip(_weights(tmp_path / "one"), _weights(tmp_path / "two")):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_demo_reaches_95_percent_on_jax_in_the_same_steps(jax_demo):
    m = metrics(jax_demo[0])
    assert m["step"] == m["total_steps"] == 880  # the demo's 880 steps on either backend
    assert m["eval_top1"] >= 0.95, m["eval_top1"]
