"""The package as users install it: a wheel, outside the checkout, its console commands and recipes."""

import glob
import json
import os
import subprocess
import sys

import pytest
from runs import ROOT


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_installs_and_its_console_script_trains_a_paper_recipe_from_anywhere(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", ROOT])
    (wheel,) = glob.glob(str(tmp_path / "dist" / "keras_mixer-*.whl"))
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel])
    # The dependencies come from this interpreter; keras_mixer only from the fresh target.
    env = {**os.environ, "PYTHONPATH": str(site), "TF_CPP_MIN_LOG_LEVEL": "3"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([sys.executable, "-c", "import keras_mixer; print(keras_mixer.__file__)"], env=env, cwd=elsewhere)
    assert where.stdout.strip().startswith(str(site)), where.stdout

    command = [sys.executable, str(site / "bin" / "keras-mixer-pretrain")]
    helped = subprocess.run(
        [*command, "--helpshort"], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300
    )
    assert "--config" in helped.stdout and "imagenet1k_b16" in helped.stdout  # the recipes inside the wheel

    # A paper recipe (ImageNet-1k B/16: RandAugment 15, mixup 0.5, bfloat16) shrunk to a CPU-sized run.
    overrides = [
        "--model",
        "T/2",
        "--dataset",
        "digits",
        "--image_size",
        "8",
        "--batch_size",
        "32",
        "--steps",
        "4",
        "--warmup_steps",
        "2",
        "--steps_per_loop",
        "2",
        "--checkpoint_every",
        "2",
        "--log_every",
        "2",
        "--noexport",
    ]  # no export: exports are tested elsewhere
    _run([*command, "--config", "imagenet1k_b16", *overrides, "--workdir", "run"], env=env, cwd=elsewhere)
    with open(elsewhere / "run" / "run.json") as f:
        recorded = json.load(f)["config"]
    assert (recorded["randaugment"], recorded["mixup"], recorded["mixed_precision"]) == (15, 0.5, "bfloat16")
    with open(elsewhere / "run" / "metrics.json") as f:
        assert json.load(f)["finished"] is True
    assert os.path.isfile(elsewhere / "run" / "model.keras") and not os.path.exists(elsewhere / "run" / "export")
    # The other commands are installed too and read what the run recorded.
    evaluated = _run(
        [sys.executable, str(site / "bin" / "keras-mixer-evaluate"), "--source", "run/model.keras"],
        env=env,
        cwd=elsewhere,
    )
    assert "top-1:" in evaluated.stdout and "digits" in evaluated.stdout
    for name in ("keras-mixer-finetune", "keras-mixer-export"):
        assert os.access(site / "bin" / name, os.X_OK)
