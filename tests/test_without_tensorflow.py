"""The JAX backend's trainer on a machine without TensorFlow (a GPU host with JAX alone): the digits
and image folders train through the NumPy/Pillow reader (`keras_mixer.data.arrays`), and the run
ends with model.keras and a note on how to export elsewhere.

"Without TensorFlow" is a real absence, not a mock: the programs run under `python -S` with a copy
of this venv's site-packages (symbolic links) that leaves TensorFlow, TFDS and tf2onnx out, so
`import tensorflow` fails and `importlib.util.find_spec("tensorflow")` finds nothing.
"""

import os
import site
import subprocess
import sys

import numpy as np
import pytest
from runs import ENV, JAX, ROOT, metrics

HIDDEN = ("tensorflow", "tf2onnx", "tf_keras")


@pytest.fixture(scope="module")
def no_tensorflow(tmp_path_factory):
    """The environment of a Python without TensorFlow installed (with `python -S`, see `run`)."""
    packages = tmp_path_factory.mktemp("site-packages")
    for folder in site.getsitepackages():
        for name in os.listdir(folder):
            # .pth files are site's (not read under -S); the package itself comes from ROOT.
            if not name.startswith(HIDDEN) and not name.endswith(".pth") and not (packages / name).exists():
                os.symlink(os.path.join(folder, name), packages / name)
    return {**ENV, **JAX, "PYTHONPATH": f"{packages}{os.pathsep}{ROOT}"}


def run(env, program, *args, check=True):
    command = [sys.executable, "-S", os.path.join(ROOT, "trainers", f"{program}.py"), *map(str, args)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{program} {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_tensorflow_is_really_absent(no_tensorflow):
    probe = "import importlib.util, keras; print(importlib.util.find_spec('tensorflow'), keras.backend.backend())"
    result = subprocess.run([sys.executable, "-S", "-c", probe], env=no_tensorflow, capture_output=True, text=True)
    assert result.stdout.split() == ["None", "jax"], result.stderr[-2000:]


@pytest.mark.slow
def test_the_digits_train_evaluate_and_probe_without_tensorflow(no_tensorflow, tmp_path):
    workdir = tmp_path / "run"
    args = ["--steps", 300, "--checkpoint_every", 100, "--fewshot_every", 300, "--fewshot_shots", "5"]
    result = run(no_tensorflow, "pretrain", *args, "--workdir", workdir)
    m = metrics(workdir)
    assert m["finished"] and m["step"] == 300 and m["strategy"] == "jax data-parallel"
    assert m["eval_top1"] > 0.8, m["eval_top1"]  # 300 of the demo's 880 steps; the whole demo reaches 95 %
    assert m["fewshot"]["5shot"] > 0.5  # chance is 0.1
    assert "TensorFlow is not installed here, so no TF Serving export was written" in result.stdout
    assert f"python trainers/export.py --source {workdir / 'model.keras'}" in result.stdout
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["100", "200", "300"]
    assert any(name.startswith("events.") for name in os.listdir(workdir / "tensorboard"))
    assert not (workdir / "export").exists()

    # model.keras scores without TensorFlow as the run scored itself (the same reader, the same counting).
    out = run(no_tensorflow, "evaluate", "--source", workdir / "model.keras").stdout
    assert float(out.split("top-1: ")[1].split()[0]) == round(m["eval_top1"], 4)  # printed to 4 places


@pytest.mark.slow
def test_an_image_folder_trains_and_resumes_without_tensorflow(no_tensorflow, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for label, name in enumerate(("dark", "light")):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):  # odd sizes: the reader crops and resizes each itself
                size = (int(rng.integers(10, 20)), int(rng.integers(10, 20)))
                level = 40 + 150 * label + rng.integers(-30, 30, (size[1], size[0], 3))
                Image.fromarray(level.clip(0, 255).astype("uint8")).save(folder / f"{i}.png")
    (tmp_path / "images" / "train" / "dark" / "notes.txt").write_text("not an image")
    args = ["--dataset", f"folder:{tmp_path / 'images'}", "--image_size", 8, "--batch_size", 8, "--seed", 0]
    args += ["--checkpoint_every", 20, "--log_every", 20, "--workdir", tmp_path / "run"]
    first = run(no_tensorflow, "pretrain", *args, "--steps", 20)
    assert "1 file without an image extension" in first.stdout + first.stderr  # named, left out
    resumed = run(no_tensorflow, "pretrain", *args, "--steps", 40, "--accept_changes", "steps")
    assert "Resumed from step 20" in resumed.stdout
    m = metrics(tmp_path / "run")
    assert m["finished"] and m["step"] == 40 and m["eval_top1"] >= 0.75, m  # dark against light: easy
