"""Trainers: recipes, schedules, clipping, strategies, preemption, the command lines end to end.

Training runs go through the real command lines in subprocesses (as a user runs them).
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
from runs import ENV, ROOT, assert_one_line_error, error_lines, metrics, trainer

from keras_mixer.training import TrainConfig, WarmupDecay, choose_strategy, clip_by_global_norm, load_config
from keras_mixer.training.config import CONFIGS_DIR

# --- recipes, schedules, clipping, strategy choice ------------------------------------------------


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_schedules_at_chosen_steps(decay):
    schedule = WarmupDecay(0.1, warmup_steps=100, total_steps=1100, decay=decay)
    lr = lambda step: float(schedule(step))  # noqa: E731
    assert lr(0) == 0 and lr(50) == pytest.approx(0.05) and lr(100) == pytest.approx(0.1)
    assert lr(600) == pytest.approx(0.05)  # half-way through the decay: linear and cosine agree
    three_quarters = 0.025 if decay == "linear" else 0.1 * (1 + np.cos(0.75 * np.pi)) / 2
    assert lr(850) == pytest.approx(three_quarters, rel=1e-5)
    assert lr(1100) == pytest.approx(0, abs=1e-9) and lr(5000) == pytest.approx(0, abs=1e-9)


def test_clipping_on_constructed_gradients():
    big = [tf.constant([3.0, 0.0]), tf.constant([[0.0], [4.0]])]  # global norm 5
    clipped, norm = clip_by_global_norm(big, 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(tf.linalg.global_norm(clipped)) == pytest.approx(1.0)
    np.testing.assert_allclose(clipped[0].numpy(), [0.6, 0.0], rtol=1e-6)  # direction kept
    small = [tf.constant([0.3, 0.4])]
    np.testing.assert_allclose(clip_by_global_norm(small, 1.0)[0][0].numpy(), [0.3, 0.4])
    np.testing.assert_allclose(clip_by_global_norm(big, None)[0][1].numpy(), [[0.0], [4.0]])


def test_strategy_resolution():
    two_workers = json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}})
    one_worker = json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})
    assert choose_strategy("auto", tpu="local") == "tpu"
    assert choose_strategy("auto", tpu="my-tpu", tf_config=two_workers, num_gpus=8) == "tpu"
    assert choose_strategy("auto", tf_config=two_workers) == "multi_worker"
    assert choose_strategy("auto", tf_config=one_worker, num_gpus=1) == "default"
    assert choose_strategy("auto", num_gpus=4) == "mirrored"
    assert choose_strategy("auto") == "default"
    assert choose_strategy("mirrored", tf_config=two_workers) == "mirrored"
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        choose_strategy("auto", tf_config="{nope")


def test_every_recipe_loads_and_paper_rows_are_exact():
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS_DIR, "[!_]*.py")))
    assert {"demo", "finetune_demo", "imagenet1k_b16", "imagenet21k_l16", "jft_h14", "finetune_imagenet"} <= set(names)
    for name in names:
        load_config(name, CONFIGS_DIR, dataset="digits").validate()
    b16 = load_config("imagenet1k_b16", CONFIGS_DIR)
    assert (b16.optimizer, b16.beta_1, b16.beta_2, b16.learning_rate, b16.weight_decay) == (
        "adamw",
        0.9,
        0.999,
        1e-3,
        0.1,
    )
    assert (b16.warmup_steps, b16.schedule, b16.batch_size, b16.grad_clip_norm, b16.epochs) == (
        10_000,
        "warmup_linear",
        4096,
        1.0,
        300,
    )
    assert (b16.randaugment, b16.mixup, b16.drop_path) == (15, 0.5, 0.1)
    l21k = load_config("imagenet21k_l16", CONFIGS_DIR)
    assert (l21k.randaugment, l21k.mixup) == (20, 0.5)
    fine = load_config("finetune_imagenet", CONFIGS_DIR)
    assert (fine.optimizer, fine.momentum, fine.weight_decay, fine.schedule, fine.batch_size) == (
        "sgd",
        0.9,
        0.0,
        "warmup_cosine",
        512,
    )
    # A length on the command line replaces the recipe's, whatever its unit.
    assert load_config("demo", CONFIGS_DIR, steps=7).epochs is None
    with pytest.raises(ValueError, match=r"unknown recipe 'nope'; recipes: .*demo"):
        load_config("nope", CONFIGS_DIR)
    with pytest.raises(ValueError, match=r"fine-tuning needs --init"):
        TrainConfig(mode="finetune", epochs=1).validate()


def test_the_flags_come_from_the_table_of_training_fields():
    """Every recipe field but the program's `mode` has a flag of its type; a flag not given keeps the
    recipe's value, "none" clears an Optional one, a comma list becomes a tuple."""
    from absl import flags

    from keras_mixer.programs import command_lines
    from keras_mixer.training.config import FLAG_FIELDS

    values = flags.FlagValues()
    command_lines.define_field_flags(FLAG_FIELDS, flag_values=values)
    assert set(values) == set(TrainConfig.__dataclass_fields__) - {"mode", "init", "flags_given"}
    values(["prog", "--mixed_precision=none", "--fewshot_shots=25,5,5", "--optimizer=sgd", "--nocache", "--steps=3"])
    overrides = command_lines.flag_overrides(FLAG_FIELDS, values)
    assert overrides == dict(mixed_precision=None, fewshot_shots=(5, 25), optimizer="sgd", cache=False, steps=3)
    recipe = load_config("imagenet1k_b16", CONFIGS_DIR)
    config = load_config("imagenet1k_b16", CONFIGS_DIR, **overrides)
    assert recipe.mixed_precision == "bfloat16" and config.mixed_precision is None  # cleared, not ignored
    assert (config.steps, config.epochs, config.batch_size) == (3, None, recipe.batch_size)
    with pytest.raises(flags.IllegalFlagValueError, match="value should be one of <adamw|sgd>"):
        values(["prog", "--optimizer=lamb"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "X/9"], r"flag --model=X/9: unknown model; valid: S/32, .*T/2"),
        (
            ["--strategy", "parallel"],
            r"flag --strategy=parallel: value should be one of <auto\|default\|mirrored\|multi_worker\|tpu>",
        ),
        (["--epochs", "1", "--steps", "5"], r"flags epochs=1.0, steps=5: At most one of \(epochs, steps\)"),
        (["--tpu", "--strategy", "mirrored"], r"--tpu conflicts with --strategy"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(args, message, tmp_path):
    result = trainer("pretrain", *args, check=False, timeout=120, env=_tensorflow_that_fails(tmp_path))
    _assert_one_usage_error(result, message)


def test_an_unknown_data_set_is_a_usage_error():
    # TFDS, which knows the names, comes with TensorFlow: this check imports it.
    result = trainer("pretrain", "--dataset", "no_such_data_set", check=False, timeout=120)
    _assert_one_usage_error(result, r"flag --dataset=no_such_data_set: unknown data set; valid: digits, folder:PATH")


def _assert_one_usage_error(result, message):
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "FATAL Flags parsing error" in line]
    assert len(errors) == 1, result.stderr[-2000:]
    assert re.search(message, errors[0]), errors[0]


def _tensorflow_that_fails(folder):
    """An environment whose `import tensorflow` fails loudly: a program that refuses its command
    line before importing TensorFlow (in a fraction of a second, not the import's seconds) never
    notices it."""
    fake = folder / "fake_tensorflow" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('TensorFlow was imported')\n")
    return {"PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}


def test_a_bad_recipe_value_is_refused_before_tensorflow_is_imported(tmp_path):
    result = trainer("pretrain", "--crop_area_min", 2, check=False, env=_tensorflow_that_fails(tmp_path))
    assert_one_line_error(result, "crop_area_min must be in (0, 1], got 2")


@pytest.mark.parametrize("asked", [False, True])
def test_tensorflow_start_up_lines_are_off_unless_asked_for(asked):
    # TensorFlow writes them while it is imported (oneDNN, CUDA, absl's InitializeLog warning), at
    # any TF_CPP_MIN_LOG_LEVEL; KERAS_MIXER_VERBOSE=1 (or --verbose) brings them back.
    env = {"KERAS_MIXER_VERBOSE": "1"} if asked else {}
    result = trainer("evaluate", "--source", "no_such_model", check=False, env=env, timeout=120)
    lines = result.stderr.splitlines()
    start_up = [line for line in lines if "absl::InitializeLog" in line or re.match(r"[IWEF]\d{4} ", line)]
    assert result.returncode == 1 and len(error_lines(result)) == 1 and "no_such_model" in error_lines(result)[0]
    assert bool(start_up) == asked, result.stderr[-2000:]


@pytest.mark.parametrize(
    "program, flags",
    [
        ("pretrain", []),
        ("evaluate", ["--source", "{tmp}/run"]),
        ("export", ["--source", "{tmp}/run", "--export_base", "{tmp}/exports"]),
        ("fewshot", ["--source", "{tmp}/run"]),
        ("visualize", ["--source", "{tmp}/run"]),
        ("study_permutation", []),
    ],
)
def test_every_program_refuses_a_stray_argument_before_any_work(tmp_path, program, flags):
    flags = [f.format(tmp=tmp_path) for f in flags]
    result = trainer(program, *flags, "stray", check=False, timeout=120, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if "stray" in line] == ["unexpected arguments: stray"]
    assert os.listdir(tmp_path) == []  # no workdir, no export base, no output written


def test_finetune_without_init_is_a_usage_error(tmp_path):
    result = trainer("finetune", "--init", "", "--workdir", tmp_path, check=False, timeout=120)
    assert result.returncode != 0 and "fine-tuning needs --init" in result.stderr


# --- the demo, end to end -------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_recipe_reaches_95_percent_and_writes_its_workdir(demo):
    workdir, result, seconds = demo
    m = metrics(workdir)
    assert m["eval_top1"] >= 0.95 and 0 <= m["eval_top5"] <= 1 and m["eval_top5"] >= m["eval_top1"]
    assert m["step"] == m["total_steps"] == 880 and m["images_per_second"] > 0
    assert m["loss_history"][-1][1] < m["loss_history"][0][1] / 10
    assert seconds < 300  # the budget on 2 CPU cores (also the README's claim)
    assert str(workdir) in result.stdout and "Finished step 880" in result.stdout
    assert "Keras on tensorflow, default strategy, 1 replica(s): /device:CPU:0" in result.stdout
    assert os.path.isfile(os.path.join(workdir, "model.keras"))
    assert os.path.isfile(os.path.join(workdir, "export", "880", "saved_model.pb"))  # the version is the step
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith("ckpt-880")
    tags = set()
    for event_file in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            tags |= {value.tag for value in event.summary.value}
    expected = {"train/loss", "train/top1", "train/learning_rate", "train/gradient_norm", "train/images_per_second"}
    assert expected | {"eval/top1", "eval/top5"} <= tags


@pytest.mark.slow
def test_evaluate_agrees_on_every_kind_of_source(demo):
    workdir, _, _ = demo
    expected = metrics(workdir)["eval_top1"]
    sources = [workdir, os.path.join(workdir, "model.keras"), os.path.join(workdir, "export")]
    sources.append(tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")))
    for source in sources:
        out = trainer("evaluate", "--source", source).stdout  # the data set is recorded with the model
        top1 = float(out.split("top-1:")[1].split()[0])
        assert top1 == pytest.approx(expected, abs=1 / 360 + 1e-9), (source, out)


@pytest.mark.slow
def test_finetune_at_twice_the_resolution_beats_chance(demo, tmp_path):
    workdir, _, _ = demo
    init = os.path.join(workdir, "model.keras")
    out = trainer("finetune", "--init", init, "--workdir", tmp_path, "--steps", 150, "--noexport")
    with open(os.path.join(tmp_path, "run.json")) as f:
        run = json.load(f)
    assert run["architecture"]["input_shape"] == [16, 16, 3]
    assert run["architecture"]["tokens_mlp_dim"] == 32 * 4  # block-diagonal expansion, K = 2 per side
    assert metrics(tmp_path)["eval_top1"] > 0.5  # chance is 0.1
    assert "Finished step 150" in out.stdout


# --- preemption and faults ------------------------------------------------------------------------


def _weights(workdir):
    import keras

    return keras.saving.load_model(os.path.join(workdir, "model.keras")).get_weights()


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["--steps", 120, "--checkpoint_every", 20, "--log_every", 20, "--seed", 3, "--noexport"]
    killed = tmp_path / "killed"
    command = [sys.executable, os.path.join(ROOT, "trainers", "pretrain.py"), *map(str, args), "--workdir", str(killed)]
    process = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.time() + 300, 0
    while time.time() < deadline and seen < 40:
        latest = tf.train.latest_checkpoint(str(killed / "checkpoints"))
        seen = int(latest.rsplit("-", 1)[1]) if latest else 0
        time.sleep(0.05)
    assert seen >= 40, "no checkpoint appeared in time"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not metrics(killed)["finished"]  # it really died mid-run (metrics.json holds its progress)

    resumed = trainer("pretrain", *args, "--workdir", killed).stdout
    m = metrics(killed)
    assert m["step"] == 120 and m["resumed_from_step"] >= seen  # no finished, saved step lost
    assert f"Resumed from step {m['resumed_from_step']}" in resumed

    trainer("pretrain", *args, "--workdir", tmp_path / "straight")
    for a, b in zip(_weights(killed), _weights(tmp_path / "straight")):
        np.testing.assert_array_equal(a, b)  # same seed, deterministic ops: bit-identical


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = trainer(
        "pretrain",
        "--steps",
        200,
        "--checkpoint_every",
        1,
        "--log_every",
        1,
        "--learning_rate",
        1e30,
        "--warmup_steps",
        1,
        "--workdir",
        tmp_path,
        check=False,
    )
    assert result.returncode != 0
    assert re.search(r"(loss is (nan|inf)|weights became NaN or Inf) at step \d+", result.stderr), result.stderr[-2000:]
    assert re.search(r"last good checkpoint \(.*ckpt-\d+\) is kept", result.stderr)
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert latest is not None
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), name


# --- distribution ---------------------------------------------------------------------------------

MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_mixer.training import TrainConfig, train
    common = dict(steps=30, log_every=5, seed=0, export=False, drop_path=0.0, checkpoint_every=1000)
    histories = {}
    for kind in ("mirrored", "default"):
        metrics = train(TrainConfig(strategy=kind, workdir=sys.argv[1] + "/" + kind, **common))
        histories[kind] = [metrics["replicas"], metrics["loss_history"]]
    print(json.dumps(histories))
    """
)


@pytest.mark.slow
def test_mirrored_over_two_cpus_trains_like_the_default_strategy(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mirrored"][0] == 2 and result["default"][0] == 1
    mirrored, default = np.array(result["mirrored"][1]), np.array(result["default"][1])
    np.testing.assert_allclose(mirrored[:, 1], default[:, 1], rtol=1e-3)
    assert mirrored[-1, 1] < mirrored[0, 1]


@pytest.mark.slow
def test_float16_training_lowers_the_loss(tmp_path):
    # bfloat16 is tested whole in tests/test_precision.py (the demo, to within half a point).
    precision = "float16"
    trainer(
        "pretrain",
        "--steps",
        30,
        "--log_every",
        10,
        "--mixed_precision",
        precision,
        "--noexport",
        "--workdir",
        tmp_path,
    )
    m = metrics(tmp_path)
    assert np.isfinite(m["train_loss"]) and m["loss_history"][-1][1] < m["loss_history"][0][1]


def test_bare_tpu_flag_means_the_local_tpu_vm():
    from keras_mixer.programs.command_lines import normalise_argv

    assert normalise_argv(["p", "--tpu"]) == ["p", "--tpu=local"]
    assert normalise_argv(["p", "--tpu", "--config", "x"]) == ["p", "--tpu=local", "--config", "x"]
    assert normalise_argv(["p", "--tpu", "my-tpu"]) == ["p", "--tpu", "my-tpu"]
    assert normalise_argv(["p", "--tpu=grpc://1.2.3.4:8470"]) == ["p", "--tpu=grpc://1.2.3.4:8470"]
