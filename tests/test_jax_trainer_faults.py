"""The TF trainers' fault guarantees, held on Keras' JAX backend.

Every JAX run is a subprocess with KERAS_BACKEND=jax. Most tests copy one finished 60-step JAX run
(checkpoints at 20, 40, 60) and break the copy, as tests/test_faults.py does on TensorFlow. Apart
from tests/test_jax_trainer.py so that the suite's two processes share the JAX runs evenly.
"""

import glob
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from runs import RUN, assert_one_line_error, error_lines, metrics
from test_faults import _flip, history_steps, snapshot, strict_load
from test_jax_trainer import _popen, _weights, jax_trainer


def _data_files(step_folder):
    return sorted(glob.glob(str(step_folder / "ocdbt.process_0" / "d" / "*")))


@pytest.mark.slow
def test_restore_walks_back_past_a_broken_checkpoint_and_keeps_the_history(jax_workdir):
    workdir = jax_workdir
    _flip(_data_files(workdir / "checkpoints" / "60")[0])
    result = jax_trainer("pretrain", *RUN, "--workdir", workdir)
    assert "Resumed from step 40" in result.stdout and "warning: checkpoint 60 does not restore" in result.stdout
    [broken] = glob.glob(str(workdir / "checkpoints" / "broken" / "60-*"))
    assert "SHA-256" in open(os.path.join(broken, "REASON.txt")).read()
    m = metrics(workdir)
    assert m["finished"] and m["step"] == 60 and m["resumed_from_step"] == 40
    assert history_steps(workdir) == [20, 40, 60]


@pytest.mark.slow
def test_finished_is_finished_and_a_changed_recipe_is_refused(jax_workdir):
    workdir = jax_workdir
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
    from keras_mixer.training.jax.checkpoints import verify_digests

    verify_digests(str(workdir / "checkpoints" / str(step)))
    assert metrics(workdir)["step"] == step and not metrics(workdir)["finished"]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run_on_jax(jax_finished, tmp_path):
    """The uninterrupted run is `jax_finished` (the demo's seed 0, stochastic depth on at 0.1): the
    resumed run must draw the masks and batches it drew."""
    args = [*RUN, "--noexport"]  # the export does not touch the weights
    killed = tmp_path / "killed"
    process = _popen([*args, "--workdir", killed], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "20" / "SHA256SUMS").exists():
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (killed / "checkpoints" / "20" / "SHA256SUMS").exists(), "no checkpoint appeared in time"
    # Killed before the end, so the resume below has work to do. (metrics.json may not be written
    # yet: it follows the checkpoint, and a kill between the two leaves only the checkpoint.)
    assert not (killed / "checkpoints" / "60").exists()

    resumed = jax_trainer("pretrain", *args, "--workdir", killed).stdout
    m = metrics(killed)
    assert m["step"] == 60 and 20 <= m["resumed_from_step"] < 60
    assert f"Resumed from step {m['resumed_from_step']}" in resumed
    for a, b in zip(_weights(killed), _weights(jax_finished[0])):
        np.testing.assert_array_equal(a, b)  # same seed, deterministic XLA programs: bit-identical


@pytest.mark.slow
def test_a_full_disk_stops_the_jax_trainer_with_one_line_and_loses_no_checkpoint(small_disk):
    disk = small_disk(3000)  # room for one 1.8 MB checkpoint, not two
    result = jax_trainer("pretrain", *RUN, "--workdir", disk / "run", check=False)
    # One error line, last, and no traceback: orbax's write threads report the same failure each, and
    # its closed event loop once per pending write; the store holds all of that back.
    [line] = error_lines(result)
    assert result.returncode == 1 and "the disk is full" in line and "Free some space" in line
    assert result.stderr.strip().splitlines()[-1] == line
    assert "Traceback" not in result.stderr and "future.py" not in result.stderr, result.stderr[-3000:]
    from keras_mixer.training.jax.checkpoints import verify_digests

    verify_digests(str(disk / "run" / "checkpoints" / "20"))  # intact: a rerun resumes there
    assert strict_load(disk / "run" / "metrics.json")["step"] == 20
