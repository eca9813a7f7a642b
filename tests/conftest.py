"""Shared test helpers: tiny Mixer configs so the suite stays fast on 2 CPU cores."""

import fcntl
import json
import os
import shutil
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

try:
    # The peers must be imported before TensorFlow: torchvision (timm imports it) segfaults when
    # loaded into a process that already holds TensorFlow 2.21 (measured here).
    import timm  # noqa: F401
    import torch  # noqa: F401
except ImportError:
    pass

import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from runs import JAX, RUN, trainer  # noqa: E402

import keras_mixer  # noqa: E402

# patch 4 on 16x16 images: a 4x4 grid of S=16 tokens, C=24, D_S=12, D_C=48.
TINY = dict(patch_size=4, hidden_dim=24, num_blocks=2, tokens_mlp_dim=12, channels_mlp_dim=48)


def tiny_mixer(**kwargs):
    """A TINY Mixer; with `weights=...` built through the loader, as the variant constructors are."""
    kwargs.setdefault("input_shape", (16, 16, 3))
    kwargs.setdefault("classes", 7)
    kwargs.setdefault("classifier_activation", None)
    if "weights" in kwargs:
        return keras_mixer.weights_io.loader.build(keras_mixer.MlpMixer, TINY, **kwargs)
    return keras_mixer.MlpMixer(**{**TINY, **kwargs})


def randomize(model, seed=0):
    """Random weights everywhere, including the zero-initialised head and biases.

    With the official zero head every logit is the bias, so comparisons of logits would be vacuous.
    """
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.2, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


@pytest.fixture
def images():
    return np.random.default_rng(1).uniform(0, 255, (3, 16, 16, 3)).astype("float32")


@pytest.fixture(autouse=True)
def _float32_policy():
    # A test that sets a mixed policy must not leak it into the next one.
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="session")
def demo(tmp_path_factory, worker_id):
    """`python trainers/pretrain.py` with the demo recipe, only the workdir moved: (workdir, the
    finished process, seconds). One run shared by every test file that needs a trained model, and
    by both pytest-xdist processes: the first to ask runs it, the other waits for it (a session
    fixture would otherwise run once in each process; every user only reads the workdir)."""
    if worker_id == "master":  # not distributed: this process's own temporary folder
        return _demo_run(tmp_path_factory.mktemp("demo"))
    shared = tmp_path_factory.getbasetemp().parent  # this session's folder, above each worker's
    with open(shared / "demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        record = shared / "demo.json"
        if not record.exists():
            _, result, seconds = _demo_run(shared / "demo")
            record.write_text(json.dumps(dict(stdout=result.stdout, stderr=result.stderr, seconds=seconds)))
        saved = json.loads(record.read_text())
    return shared / "demo", subprocess.CompletedProcess([], 0, saved["stdout"], saved["stderr"]), saved["seconds"]


def _demo_run(workdir):
    started = time.perf_counter()
    result = trainer("pretrain", "--workdir", workdir)
    return workdir, result, time.perf_counter() - started


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size mounted in tmp_path (needs root, as CI runs); skipped elsewhere."""
    mounted = []

    def mount(kilobytes):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(point)], capture_output=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture(scope="module")
def jax_finished(tmp_path_factory):
    """A finished 60-step demo run on the JAX backend (checkpoints 20, 40, 60, model.keras, export/60):
    (workdir, the program's result). Once per test file that asks for it."""
    workdir = tmp_path_factory.mktemp("jax_finished") / "run"
    return workdir, trainer("pretrain", *RUN, "--workdir", workdir, env=JAX)


@pytest.fixture
def jax_workdir(jax_finished, tmp_path):
    """A copy of `jax_finished`'s workdir for a test to break."""
    copy = tmp_path / "run"
    shutil.copytree(jax_finished[0], copy)
    return copy
