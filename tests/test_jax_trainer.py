"""The trainers on Keras' JAX backend: the same programs, outputs and guarantees as on TensorFlow.

This test process runs Keras on TensorFlow; every JAX run is a subprocess with KERAS_BACKEND=jax
(two CPU devices through XLA_FLAGS where said). Most fault tests copy one finished 60-step JAX run
(checkpoints at 20, 40, 60) and break the copy, as tests/test_faults.py does on TensorFlow.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from runs import ENV, ROOT, assert_one_line_error, error_lines, metrics, trainer
from test_faults import _flip, history_steps, snapshot, strict_load

from keras_mixer.training.config import load_config
from keras_mixer.training.jax_loop import check_jax_fields

JAX = {"KERAS_BACKEND": "jax"}
TWO_DEVICES = {**JAX, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
RUN = ["--steps", 60, "--checkpoint_every", 20, "--log_every", 20]


def jax_trainer(program, *args, env=JAX, **kwargs):
    return trainer(program, *args, env=env, **kwargs)


def _popen(args, env=JAX, **kwargs):
    command = [sys.executable, os.path.join(ROOT, "trainers", "pretrain.py"), *map(str, args)]
    return subprocess.Popen(command, env={**ENV, **env}, cwd=ROOT, **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 60-step demo run on the JAX backend: checkpoints 20, 40, 60, model.keras, export/60."""
    workdir = tmp_path_factory.mktemp("jax_finished") / "run"
    result = jax_trainer("pretrain", *RUN, "--workdir", workdir)
    return workdir, result


@pytest.fixture
def workdir(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished[0], copy)
    return copy


@pytest.fixture(scope="module")
def tf_run(tmp_path_factory):
    """A finished 20-step demo run on the TensorFlow backend (its model.keras starts the runs below)."""
    workdir = tmp_path_factory.mktemp("tf_run") / "run"
    trainer("pretrain", "--steps", 20, "--log_every", 20, "--checkpoint_every", 20, "--workdir", workdir)
    return workdir


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
def test_a_jax_run_writes_what_a_tf_run_writes_and_each_backend_reads_the_other(finished, tf_run, tmp_path):
    workdir, result = finished
    assert "Keras on jax, DataParallel over 1 device(s) on 1 host(s): cpu:0" in result.stdout
    m = strict_load(workdir / "metrics.json")
    assert set(m) == set(strict_load(tf_run / "metrics.json"))  # the same fields
    assert m["finished"] and m["step"] == 60 and m["strategy"] == "jax data-parallel" and m["replicas"] == 1
    assert history_steps(workdir) == [20, 40, 60]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "40", "60"]
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
def test_a_workdir_resumes_only_on_the_backend_that_wrote_its_checkpoints(tf_run, workdir):
    for run, wrote, other in ((tf_run, "tensorflow", JAX), (workdir, "jax", {"KERAS_BACKEND": "tensorflow"})):
        more = ["--steps", 80, "--accept_changes", "steps"]
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
def test_the_demo_reaches_95_percent_on_jax_in_the_same_steps(tmp_path):
    jax_trainer("pretrain", "--workdir", tmp_path / "demo", "--noexport")
    m = metrics(tmp_path / "demo")
    assert m["step"] == m["total_steps"] == 880  # the demo's 880 steps on either backend
    assert m["eval_top1"] >= 0.95, m["eval_top1"]


# --- faults --------------------------------------------------------------------------------------


def _data_files(step_folder):
    return sorted(glob.glob(str(step_folder / "ocdbt.process_0" / "d" / "*")))


@pytest.mark.slow
def test_restore_walks_back_past_a_broken_checkpoint_and_keeps_the_history(workdir):
    _flip(_data_files(workdir / "checkpoints" / "60")[0])
    result = jax_trainer("pretrain", *RUN, "--workdir", workdir)
    assert "Resumed from step 40" in result.stdout and "warning: checkpoint 60 does not restore" in result.stdout
    [broken] = glob.glob(str(workdir / "checkpoints" / "broken" / "60-*"))
    assert "SHA-256" in open(os.path.join(broken, "REASON.txt")).read()
    m = metrics(workdir)
    assert m["finished"] and m["step"] == 60 and m["resumed_from_step"] == 40
    assert history_steps(workdir) == [20, 40, 60]


@pytest.mark.slow
def test_finished_is_finished_and_a_changed_recipe_is_refused(workdir):
    before = snapshot(workdir)
    again = jax_trainer("pretrain", *RUN, "--workdir", workdir)
    assert "already finished at step 60" in again.stdout and snapshot(workdir) == before
    run_json = (workdir / "run.json").read_bytes()
    changed = jax_trainer("pretrain", *RUN, "--learning_rate", 0.01, "--workdir", workdir, check=False)
    assert_one_line_error(changed, "learning_rate 0.003 -> 0.01", "--accept_changes=learning_rate")
    assert (workdir / "run.json").read_bytes() == run_json


@pytest.mark.slow
def test_a_workdir_in_use_is_refused(tmp_path):
    from keras_mixer.training.workdir import WorkdirLock

    (tmp_path / "run").mkdir()
    with WorkdirLock(str(tmp_path / "run")):  # this test process owns it
        result = jax_trainer("pretrain", *RUN, "--workdir", tmp_path / "run", check=False)
    assert_one_line_error(result, f"in use by pid {os.getpid()}")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_on_jax(tmp_path):
    workdir = tmp_path / "run"
    args = ["--steps", 100_000, "--checkpoint_every", 100_000, "--workdir", workdir]
    process = _popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (workdir / "tensorboard").exists():
        time.sleep(0.2)
    time.sleep(5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    step = int(line.split("stopped by SIGTERM at step ")[1].split()[0])
    assert step > 0 and f"checkpoints/{step} written" in line
    from keras_mixer.training.orbax_store import verify_digests

    verify_digests(str(workdir / "checkpoints" / str(step)))
    assert metrics(workdir)["step"] == step and not metrics(workdir)["finished"]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run_on_jax(tmp_path):
    """Stochastic depth on (the demo's 0.1): the resumed run draws the masks the straight one drew."""
    args = ["--steps", 120, "--checkpoint_every", 20, "--log_every", 20, "--seed", 3, "--noexport"]
    killed = tmp_path / "killed"
    process = _popen([*args, "--workdir", killed], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "40" / "SHA256SUMS").exists():
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (killed / "checkpoints" / "40" / "SHA256SUMS").exists(), "no checkpoint appeared in time"
    assert not metrics(killed)["finished"]

    resumed = jax_trainer("pretrain", *args, "--workdir", killed).stdout
    m = metrics(killed)
    assert m["step"] == 120 and m["resumed_from_step"] >= 40
    assert f"Resumed from step {m['resumed_from_step']}" in resumed
    jax_trainer("pretrain", *args, "--workdir", tmp_path / "straight")
    for a, b in zip(_weights(killed), _weights(tmp_path / "straight")):
        np.testing.assert_array_equal(a, b)  # same seed, deterministic XLA programs: bit-identical


@pytest.mark.slow
def test_a_full_disk_stops_the_jax_trainer_with_one_line_and_loses_no_checkpoint(small_disk):
    disk = small_disk(3000)  # room for one 1.8 MB checkpoint, not two
    result = jax_trainer("pretrain", *RUN, "--workdir", disk / "run", check=False)
    # One error line, last; orbax's write threads log their own tracebacks before it (not muted yet).
    [line] = error_lines(result)
    assert result.returncode == 1 and "the disk is full" in line and "Free some space" in line
    assert result.stderr.strip().splitlines()[-1] == line
    from keras_mixer.training.orbax_store import verify_digests

    verify_digests(str(disk / "run" / "checkpoints" / "20"))  # intact: a rerun resumes there
    assert strict_load(disk / "run" / "metrics.json")["step"] == 20
