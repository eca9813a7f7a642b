"""Faults, injected as they happen to long runs and public endpoints, and what must hold after each.

Most tests copy one finished short run (60 steps, checkpoints at 20, 40, 60) and break the copy.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY, randomize, tiny_mixer
from runs import ENV, ROOT, RUN, assert_one_line_error, metrics, trainer

import keras_mixer
from keras_mixer.serving.export import export_saved_model


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 60-step demo run: checkpoints at 20, 40 and 60, model.keras, export/60."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = trainer("pretrain", *RUN, "--workdir", workdir)
    (workdir.parent / "stdout.txt").write_text(result.stdout)  # what the run printed, beside it
    return workdir


@pytest.fixture
def workdir(finished, tmp_path):
    """A private copy of the finished run, to break."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def snapshot(folder):
    """{relative path: (sha256, mtime)} of every file but the lock."""
    found = {}
    for path in glob.glob(os.path.join(folder, "**"), recursive=True):
        if os.path.isfile(path) and os.path.basename(path) != "lock":
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return found


def strict_load(path):
    """json.load that fails on NaN/Infinity, which strict JSON readers reject."""
    with open(path) as f:
        return json.load(f, parse_constant=lambda name: pytest.fail(f"{path} holds {name}"))


def history_steps(workdir):
    return [step for step, _ in metrics(workdir)["loss_history"]]


# --- finished is finished; readable outputs -----------------------------------------------------


@pytest.mark.slow
def test_progress_written_to_a_file_is_one_line_per_log_point(finished):
    # The trainer's stdout is a pipe here, as a log file is: whole lines, no bar redrawn with \r.
    printed = (finished.parent / "stdout.txt").read_text()
    assert "\r" not in printed and "\x1b[" not in printed
    progress = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["20/60", "40/60", "60/60"], printed
    line_form = r"step \d+/60  loss \d+\.\d{4}( {2}img/s \d+)?( {2}ETA \S+( \S+)?)?"
    assert all(re.fullmatch(line_form, line) for line in progress), progress
    assert "ETA" in progress[0] and "ETA" not in progress[-1]  # nothing left to wait for at the end


@pytest.mark.slow
def test_rerunning_a_finished_run_rewrites_nothing(workdir, finished):
    before = snapshot(workdir)
    result = trainer("pretrain", *RUN, "--workdir", workdir)
    assert "already finished at step 60" in result.stdout
    [finish_line] = [line for line in (finished.parent / "stdout.txt").read_text().splitlines() if "Finished" in line]
    top1 = re.search(r"eval top-1 ([0-9.]+)", finish_line).group(1)
    assert f"(eval top-1 {top1})" in result.stdout  # as the finish line said it
    assert snapshot(workdir) == before  # no rewritten metrics, no second export
    assert sorted(os.listdir(workdir / "export")) == ["60"]
    m = strict_load(workdir / "metrics.json")
    assert m["finished"] is True and m["step"] == 60 and history_steps(workdir) == [20, 40, 60]


@pytest.mark.slow
def test_a_run_killed_while_finishing_completes_without_training_or_a_second_export(workdir):
    progress = metrics(workdir)
    progress.update(finished=False, eval_top1=None)  # as metrics.json stands before the end
    (workdir / "metrics.json").write_text(json.dumps(progress))
    (workdir / "model.keras").unlink()
    export_files = snapshot(workdir / "export")
    result = trainer("pretrain", *RUN, "--workdir", workdir)
    assert "Resumed from step 60" in result.stdout and "Finished step 60" in result.stdout
    assert snapshot(workdir / "export") == export_files and (workdir / "model.keras").is_file()
    m = strict_load(workdir / "metrics.json")
    assert m["finished"] and m["eval_top1"] > 0.5 and history_steps(workdir) == [20, 40, 60]


def test_outputs_follow_the_umask_and_are_world_readable(finished):
    paths = [finished / "metrics.json", finished / "run.json", finished / "model.keras"]
    for root, dirs, files in os.walk(finished / "export"):
        paths += [os.path.join(root, name) for name in dirs + files]
    for path in paths:
        mode = os.stat(path).st_mode
        expected = 0o755 if os.path.isdir(path) else 0o644  # the test runs the trainer with umask 022
        assert mode & 0o777 == expected, (path, oct(mode))
    export = json.loads((finished / "export" / "60" / "assets.extra" / "keras_mixer.json").read_text())
    assert export["dataset"] == "digits" and export["class_names"] == [str(d) for d in range(10)]


# --- restore never goes backwards silently --------------------------------------------------------


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip(path):
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


BREAKS = {
    "index deleted": lambda c: os.unlink(c / "ckpt-60.index"),
    "data deleted": lambda c: os.unlink(c / "ckpt-60.data-00000-of-00001"),
    "data truncated": lambda c: _truncate(c / "ckpt-60.data-00000-of-00001"),
    "index truncated": lambda c: _truncate(c / "ckpt-60.index"),
    "index bytes flipped": lambda c: _flip(c / "ckpt-60.index"),
    "data bytes flipped": lambda c: _flip(c / "ckpt-60.data-00000-of-00001"),
}


def _store(directory, keep=3):
    """A CheckpointStore over a small state: a 1000-float vector and a step."""
    from keras_mixer.training.tf.checkpoints import checkpoint_store

    state = dict(vector=tf.Variable(np.zeros(1000, np.float32)), step=tf.Variable(0, dtype=tf.int64))
    return checkpoint_store(tf.train.Checkpoint(**state), str(directory), keep), state


def _saved(directory, steps=(20, 40, 60), keep=3):
    store, state = _store(directory, keep)
    for step in steps:
        state["vector"].assign(np.full(1000, step, np.float32))
        state["step"].assign(step)
        store.save(step)
    return store


@pytest.mark.parametrize("fault", list(BREAKS))
def test_restore_walks_back_to_the_newest_intact_checkpoint(tmp_path, fault):
    _saved(tmp_path)
    BREAKS[fault](tmp_path)
    remains = [name for name in os.listdir(tmp_path) if name.startswith("ckpt-60.")]
    store, state = _store(tmp_path)
    assert store.restore_newest()[0] == 40 and int(state["step"].numpy()) == 40
    assert (state["vector"].numpy() == 40).all()
    [aside] = glob.glob(str(tmp_path / "broken" / "ckpt-60-*"))
    assert open(os.path.join(aside, "REASON.txt")).read().strip()  # the reason, kept with the files
    assert sorted(os.listdir(aside)) == sorted(remains + ["REASON.txt"])  # moved, not deleted
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-40")  # the state file agrees
    store.save(60)
    store.save(80)
    assert sorted(glob.glob(str(tmp_path / "ckpt-*.index"))) == [
        str(tmp_path / f"ckpt-{s}.index") for s in (40, 60, 80)
    ]


@pytest.mark.parametrize("state_file", ["deleted", "garbage", "empty", "points to a missing one"])
def test_restore_does_not_trust_the_state_file(tmp_path, state_file):
    _saved(tmp_path)
    path = tmp_path / "checkpoint"
    if state_file == "deleted":
        path.unlink()
    else:
        text = {
            "garbage": b"\xff\xfe garbage \x00",
            "empty": b"",
            "points to a missing one": b'model_checkpoint_path: "ckpt-7"',
        }
        path.write_bytes(text[state_file])
    store, state = _store(tmp_path)
    assert store.restore_newest()[0] == 60 and (state["vector"].numpy() == 60).all()


def test_when_no_checkpoint_restores_nothing_is_moved_and_every_one_is_named(tmp_path):
    from keras_mixer.training.checkpoint_store import NoCheckpointRestores

    _saved(tmp_path)
    for path in glob.glob(str(tmp_path / "ckpt-*.data-*")):
        _truncate(path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(NoCheckpointRestores, match=r"ckpt-60 .*ckpt-40 .*ckpt-20 .*--restart"):
        _store(tmp_path)[0].restore_newest()
    assert sorted(os.listdir(tmp_path)) == before


def test_rotation_keeps_the_newest_and_counts_only_complete_checkpoints(tmp_path):
    store = _saved(tmp_path, steps=(10, 20), keep=2)
    (tmp_path / "ckpt-15.data-00000-of-00001").write_bytes(b"left by a kill, no index")
    store.save(30)
    assert sorted(glob.glob(str(tmp_path / "ckpt-*.index"))) == [str(tmp_path / f"ckpt-{s}.index") for s in (20, 30)]
    one = _saved(tmp_path / "one", steps=(1, 2, 3), keep=1)
    assert one.latest().endswith("ckpt-3") and os.path.isfile(one.latest() + ".index")


@pytest.mark.slow
def test_the_trainer_resumes_before_a_broken_checkpoint_and_keeps_the_history(workdir):
    checkpoints = workdir / "checkpoints"
    _flip(checkpoints / "ckpt-60.data-00000-of-00001")
    (checkpoints / "checkpoint").write_bytes(b"\x00 garbage")  # and the state file is no help either
    result = trainer("pretrain", *RUN, "--workdir", workdir)
    assert "Resumed from step 40" in result.stdout
    assert "warning: checkpoint ckpt-60 does not restore" in result.stdout
    assert glob.glob(str(checkpoints / "broken" / "ckpt-60-*" / "ckpt-60.data-*"))
    assert all((checkpoints / f"ckpt-{s}.index").exists() for s in (20, 40, 60))
    m = metrics(workdir)
    assert m["step"] == 60 and m["resumed_from_step"] == 40 and m["finished"]
    assert history_steps(workdir) == [20, 40, 60]  # the history before the resume is kept


@pytest.mark.slow
def test_when_no_checkpoint_restores_the_run_stops_until_told_to_restart(workdir):
    checkpoints = workdir / "checkpoints"
    for path in glob.glob(str(checkpoints / "ckpt-*.data-*")):
        _truncate(path)
    before, names = snapshot(workdir), sorted(os.listdir(checkpoints))
    result = trainer("pretrain", *RUN, "--workdir", workdir, check=False)
    line = assert_one_line_error(result, "none restores", "ckpt-20", "ckpt-40", "ckpt-60", "--restart")
    assert "Nothing was changed" in line and snapshot(workdir) == before

    result = trainer("pretrain", *RUN, "--workdir", workdir, "--restart")
    assert "Resumed" not in result.stdout and metrics(workdir)["resumed_from_step"] == 0
    [previous] = glob.glob(str(workdir / "previous" / "*"))
    assert sorted(os.listdir(os.path.join(previous, "checkpoints"))) == names
    assert os.path.isfile(os.path.join(previous, "metrics.json"))  # the old run's files: moved, not deleted


# --- the recipe is checked on resume ------------------------------------------------------------


@pytest.mark.slow
def test_a_changed_recipe_is_refused_unless_accepted_and_then_recorded(workdir):
    run_json = (workdir / "run.json").read_bytes()
    result = trainer("pretrain", *RUN, "--learning_rate", 0.01, "--workdir", workdir, check=False)
    assert_one_line_error(result, "learning_rate 0.003 -> 0.01", "--accept_changes=learning_rate", "--restart")
    assert (workdir / "run.json").read_bytes() == run_json

    # Augmentation flags are recipe fields too (the recipe's crops, scaled to this short run).
    crops = json.loads(run_json)["config"]["crop_area_min"]
    assert 0.7 < crops < 1
    result = trainer("pretrain", *RUN, "--crop_area_min", 1, "--flip", "--workdir", workdir, check=False)
    assert_one_line_error(
        result, f"crop_area_min {crops} -> 1.0", "flip False -> True", "--accept_changes=crop_area_min,flip"
    )

    longer = ["--steps", 80, "--checkpoint_every", 20, "--log_every", 20, "--crop_area_min", 1]
    result = trainer("pretrain", *longer, "--accept_changes", "steps,crop_area_min", "--workdir", workdir)
    assert "Resumed from step 60" in result.stdout
    # Whole images in training, centre crops at evaluation: said, with the fix.
    assert "warning: training sees whole images" in result.stdout and "--eval_resize resize" in result.stdout
    assert metrics(workdir)["step"] == 80 and history_steps(workdir) == [20, 40, 60, 80]
    assert sorted(os.listdir(workdir / "export")) == ["60", "80"]
    changes = json.loads((workdir / "run.json").read_text())["recipe_changes"]
    assert changes == [
        dict(step=60, field="steps", recorded=60, now=80),
        dict(step=60, field="crop_area_min", recorded=crops, now=1.0),
    ]


# --- one owner per workdir; leftovers of a kill -------------------------------------------------


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path):
    workdir = tmp_path / "run"
    long_run = [*RUN[:0], "--steps", 100_000, "--checkpoint_every", 20, "--log_every", 20, "--workdir", workdir]
    command = [sys.executable, os.path.join(ROOT, "trainers", "pretrain.py"), *map(str, long_run)]
    owner = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not glob.glob(str(workdir / "checkpoints" / "ckpt-*.index")):
            time.sleep(0.2)
        assert json.loads((workdir / "lock").read_text())["pid"] == owner.pid
        started = time.perf_counter()
        second = trainer("pretrain", *long_run, "--learning_rate", 0.01, check=False)
        assert_one_line_error(second, f"in use by pid {owner.pid}", "Wait for that run")
        assert time.perf_counter() - started < 120
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
    # What a kill leaves behind: staging folders and temporary files.
    litter = [workdir / "checkpoints" / "ckpt-999_temp", workdir / "export" / ".tmp-export-x1"]
    for folder in litter:
        folder.mkdir(parents=True, exist_ok=True)
    (workdir / ".tmp-123-metrics.json").write_text("{")
    litter.append(workdir / ".tmp-123-metrics.json")

    resumed = trainer("pretrain", *long_run[:-2], "--steps", 60, "--accept_changes", "steps", "--workdir", workdir)
    assert f"took over a stale workdir lock (pid {owner.pid}" in resumed.stderr
    assert not any(path.exists() for path in litter)
    assert metrics(workdir)["resumed_from_step"] >= 20 and (workdir / "lock").read_text() == ""


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_143(tmp_path):
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        os.path.join(ROOT, "trainers", "pretrain.py"),
        "--steps",
        "100000",
        "--checkpoint_every",
        "100000",
        "--workdir",
        str(workdir),
    ]
    process = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (workdir / "tensorboard").exists():  # training has begun
        time.sleep(0.2)
    time.sleep(3)
    process.send_signal(signal.SIGTERM)  # what a scheduler or a preemptible VM sends first
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    step = int(line.split("stopped by SIGTERM at step ")[1].split()[0])
    assert step > 0 and f"ckpt-{step} written" in line and "Rerun the same command" in line
    from keras_mixer.training.tf.checkpoints import verify

    verify(str(workdir / "checkpoints" / f"ckpt-{step}"))
    assert metrics(workdir)["step"] == step and not metrics(workdir)["finished"]


def test_a_lock_record_from_another_host_counts_until_its_heartbeat_stops(tmp_path, capsys):
    from keras_mixer.training.workdir import STALE_AFTER_SECONDS, WorkdirError, WorkdirLock

    record = dict(pid=4242, host="another-host", started="2026-01-01T00:00:00Z", command="pretrain.py")
    (tmp_path / "lock").write_text(json.dumps(record))  # a live holder elsewhere on a shared file system
    with pytest.raises(WorkdirError, match=r"in use by pid 4242 on host 'another-host'"):
        WorkdirLock(str(tmp_path)).acquire()
    stale = time.time() - STALE_AFTER_SECONDS - 60
    os.utime(tmp_path / "lock", (stale, stale))  # its heartbeat stopped
    with WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    assert "took over a stale workdir lock (pid 4242 on another-host" in capsys.readouterr().err
    assert (tmp_path / "lock").read_text() == ""  # released: empty


# --- a full disk --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_stops_training_with_one_line_and_loses_no_finished_checkpoint(small_disk):
    disk = small_disk(2500)  # room for one 1.7 MB checkpoint, not two
    result = trainer("pretrain", *RUN, "--workdir", disk / "run", check=False)
    assert_one_line_error(result, "the disk is full", "Free some space")
    from keras_mixer.training.tf.checkpoints import verify

    verify(str(disk / "run" / "checkpoints" / "ckpt-20"))  # every tensor reads back: a rerun resumes there
    assert tf.train.latest_checkpoint(str(disk / "run" / "checkpoints")).endswith("ckpt-20")
    assert strict_load(disk / "run" / "metrics.json")["step"] == 20  # progress of the finished steps


def test_a_full_disk_during_export_leaves_no_partial_version(small_disk, finished):
    disk = small_disk(300)
    result = trainer("export", "--source", finished / "model.keras", "--export_base", disk / "models", check=False)
    assert_one_line_error(result, "the disk is full")
    assert os.listdir(disk / "models") == []  # no version folder, no staging folder


# --- one-line errors and --help -----------------------------------------------------------------


def _folder_with_an_empty_class(root):
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "dog").mkdir(parents=True)
        tf.io.write_file(str(root / split / "cat" / "a.png"), tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)))
    return f"folder:{root}"


def _a_file(path):
    path.write_text("")
    return str(path)


def _raising_recipe(root):
    path = root / "mine.py"
    path.write_text("def get_config():\n    return dict(model='T/2', epochs=1 / 0)\n")
    return str(path)


USER_ERRORS = {
    "image size not a multiple of the patch": (["--image_size", 9], "not a positive multiple of the patch size 2"),
    "zero steps": (["--steps", 0], "steps must be a positive integer, got 0"),
    "negative steps": (["--steps", -1], "steps must be a positive integer, got -1"),
    "empty class folder": (["--dataset", _folder_with_an_empty_class], "has no readable .jpg/.jpeg/.png images"),
    "recipe that raises": (["--config", _raising_recipe], "failed at line 2: ZeroDivisionError"),
    "workdir is a file": (["--workdir", lambda root: _a_file(root / "file")], "is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_of_pretrain_are_one_line(case, tmp_path):
    args, message = USER_ERRORS[case]
    args = [a(tmp_path) if callable(a) else a for a in args]
    if "--workdir" not in args:
        args += ["--workdir", tmp_path / "run"]
    assert_one_line_error(trainer("pretrain", *args, check=False), message)


def test_the_trainers_on_another_keras_backend_stop_in_one_line_before_writing(tmp_path):
    # tensorflow and jax run the trainers (tests/test_jax_trainer.py); torch does not.
    result = trainer("pretrain", "--workdir", tmp_path / "run", check=False, env={"KERAS_BACKEND": "torch"})
    assert_one_line_error(result, "KERAS_BACKEND=torch", "tensorflow and jax backends")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "init, message", [("notes.txt", "Unrecognised weights file"), ("missing.keras", "does not exist")]
)
def test_a_bad_init_is_one_line(init, message, tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    result = trainer(
        "finetune", "--init", tmp_path / init, "--model", "T/2", "--workdir", tmp_path / "run", check=False
    )
    assert_one_line_error(result, message, init)


@pytest.mark.slow
def test_help_shows_each_programs_own_flags():
    runs = [
        ("pretrain", "--help", ["--steps:", "--workdir:", "--[no]restart:", "--accept_changes:", "--[no]debug:"]),
        ("export", "--helpshort", ["--source:", "--export_base:", "--max_pixels:"]),
    ]
    for program, flag, expected in runs:
        out = trainer(program, flag, check=False).stdout
        missing = [name for name in expected if name not in out]
        assert not missing, (program, flag, missing, out[:3000])


# --- serving is bounded ---------------------------------------------------------------------------


def png_bomb(width, height):
    """A valid 1-bit greyscale PNG of width x height, all black: a few KB on disk, width*height*3
    bytes once decoded to RGB."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def jpeg_claiming(width, height):
    """A small real JPEG whose SOF header is rewritten to declare width x height."""
    data = bytearray(tf.io.encode_jpeg(np.full((16, 16, 3), 128, np.uint8)).numpy())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


SERVER = textwrap.dedent(
    """
    import json, resource, sys, time
    import tensorflow as tf
    serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    report = {}
    for name in sys.argv[2:]:
        payload = open(name, "rb").read()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        try:
            top = serve(image_bytes=tf.constant([payload]))["top_k_ids"].numpy().tolist()
            outcome = "served"
        except tf.errors.InvalidArgumentError as e:
            outcome, top = str(e), None
        seconds = time.perf_counter() - started
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
        report[name.rsplit("/", 1)[-1]] = dict(outcome=outcome, seconds=seconds, grown_mb=grown, top=top)
    print(json.dumps(report))
    """
)


def test_the_bytes_signature_refuses_images_over_the_pixel_budget_fast(tmp_path):
    model = randomize(tiny_mixer())
    export = export_saved_model(model, tmp_path / "models", max_pixels=50 * 50)
    requests = dict(
        small_png=tf.io.encode_png(np.full((40, 40, 3), 90, np.uint8)).numpy(),
        png_20000=png_bomb(20000, 20000),
        jpeg_30000=jpeg_claiming(30000, 30000),
        png_60=tf.io.encode_png(np.full((60, 60, 3), 90, np.uint8)).numpy(),  # 3600 > 2500 pixels
        not_an_image=b"GIF89a but not really",
        small_png_again=tf.io.encode_png(np.full((40, 40, 3), 90, np.uint8)).numpy(),
    )
    names = []
    for name, payload in requests.items():
        (tmp_path / name).write_bytes(payload)
        names.append(str(tmp_path / name))
    assert len(requests["png_20000"]) < 400_000  # a small request ...
    out = subprocess.run(
        [sys.executable, "-c", SERVER, export, *names], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("png_20000", "jpeg_30000"):  # ... that would decode to 1.2 GB and 2.7 GB of pixels
        assert "over the pixel budget of 2500 pixels" in report[name]["outcome"], report[name]
        assert report[name]["seconds"] < 1.0 and report[name]["grown_mb"] < 100, report[name]
    assert "20000x20000" in report["png_20000"]["outcome"] and "30000x30000" in report["jpeg_30000"]["outcome"]
    assert "60x60" in report["png_60"]["outcome"]
    assert "not a JPEG or PNG image" in report["not_an_image"]["outcome"]
    assert report["small_png"]["outcome"] == report["small_png_again"]["outcome"] == "served"  # still serving
    assert report["small_png"]["top"] == report["small_png_again"]["top"]


# --- nothing dropped in silence -----------------------------------------------------------------


@pytest.mark.slow
def test_images_that_fail_to_decode_are_counted_and_reported(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("a", "b"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(6):
                image = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
                tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(image))
    bad = tmp_path / "data" / "train" / "a" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 255, 2000, dtype=np.uint8)))  # JPEG magic, garbage
    (tmp_path / "data" / "train" / "b" / "readme.txt").write_text("not an image")
    result = trainer(
        "pretrain",
        "--dataset",
        f"folder:{tmp_path / 'data'}",
        "--steps",
        3,
        "--batch_size",
        4,
        "--workdir",
        tmp_path / "run",
    )
    [line] = [line for line in result.stdout.splitlines() if line.startswith("warning:") and "split 'train'" in line]
    assert "1 image that fails to decode" in line and "bad.jpg" in line
    assert "1 file without an image extension" in line and "readme.txt" in line
    problems = metrics(tmp_path / "run")["data_problems"]["train"]
    assert problems["images_that_fail_to_decode"] == dict(count=1, first=[str(bad)])
    assert problems["files_without_an_image_extension"]["count"] == 1


# --- weights: errors that say what to do --------------------------------------------------------


def test_an_unreachable_preset_says_how_to_supply_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_MIXER_WEIGHTS_URL", f"file://{tmp_path}/no-mirror-here")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "cache"))
    from keras_mixer.weights_io.presets import PresetUnavailable

    with pytest.raises(PresetUnavailable) as caught:
        keras_mixer.MixerB16(weights="imagenet1k")
    message = str(caught.value)
    assert "KERAS_MIXER_WEIGHTS_URL" in message and "weights='/path/Mixer-B_16.npz'" in message
    assert "imagenet1k/Mixer-B_16.npz" in message and "\n" not in message

    result = trainer(
        "export",
        "--source",
        "imagenet1k",
        "--model",
        "B/16",
        "--export_base",
        tmp_path / "m",
        check=False,
        env={"KERAS_MIXER_WEIGHTS_URL": f"file://{tmp_path}/no-mirror-here", "KERAS_HOME": str(tmp_path / "cache")},
    )
    assert_one_line_error(result, "KERAS_MIXER_WEIGHTS_URL")


def test_weights_of_another_width_are_named_plainly_with_no_misleading_log(tmp_path, caplog):
    keras_mixer.save_npz(randomize(tiny_mixer()), tmp_path / "narrow.npz")
    wide = keras_mixer.MlpMixer(**{**TINY, "hidden_dim": 32}, input_shape=(16, 16, 3), classes=7)
    with caplog.at_level("INFO", logger="keras_mixer"), pytest.raises(keras_mixer.WeightsError) as caught:
        keras_mixer.load_weights(wide, tmp_path / "narrow.npz")
    message = str(caught.value)
    assert "different Mixer architecture (width differ)" in message
    assert "width C 24" in message and "width C 32" in message
    assert "head" not in caplog.text  # no "head set to zeros" before the error
