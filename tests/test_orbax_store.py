"""The JAX backend's checkpoint store: orbax checkpoints with the TF trainers' walk-back rule.
Each fault is injected into real files orbax wrote."""

import os

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

from keras_mixer.training.checkpoint_store import CheckpointMismatch, NoCheckpointRestores  # noqa: E402
from keras_mixer.training.jax.checkpoints import DIGESTS, orbax_store  # noqa: E402


def _state(step, width=300):
    """A training state's shape: weight lists and scalars, values that differ per step."""
    rng = np.random.default_rng(step)
    return {
        "trainable": [rng.normal(size=(width, 40)).astype(np.float32), rng.normal(size=40).astype(np.float32)],
        "optimizer": [np.asarray(step, np.int64)],
        "step": np.asarray(step, np.int64),
    }


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


def _leaves(state):
    return [*state["trainable"], *state["optimizer"], state["step"]]


def _largest_file(folder):
    paths = [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names if n != DIGESTS]
    return max(paths, key=os.path.getsize)


def _saved(tmp_path, steps, keep=5):
    store = orbax_store(str(tmp_path / "checkpoints"), keep)
    for step in steps:
        store.save(step, _state(step))
    return store


def test_a_saved_state_restores_exactly_and_rotation_keeps_the_newest(tmp_path):
    store = _saved(tmp_path, [10, 20, 30, 40], keep=2)
    assert sorted(os.listdir(store.directory)) == ["30", "40"] and store.latest().endswith("40")
    step, state = orbax_store(store.directory, 2).restore_newest(_state(0))
    assert step == 40 and _same(state, _state(40)) and not _same(state, _state(30))
    assert orbax_store(str(tmp_path / "empty"), 2).restore_newest(_state(0)) == (None, None)


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("flip", "does not match its SHA-256 digest"),  # orbax alone restores this one silently
        ("truncate", "does not match its SHA-256 digest"),
        ("remove", "is missing"),
        ("no_digests", "SHA256SUMS is missing: the save did not finish"),
    ],
)
def test_a_broken_newest_checkpoint_is_moved_aside_and_the_one_before_restores(tmp_path, fault, reason):
    store = _saved(tmp_path, [10, 20])
    newest = store.path(20)
    path = _largest_file(newest)
    data = bytearray(open(path, "rb").read())
    if fault == "flip":
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
    elif fault == "truncate":
        open(path, "wb").write(bytes(data[: len(data) // 2]))
    elif fault == "remove":
        os.remove(path)
    else:
        os.remove(os.path.join(newest, DIGESTS))
    step, state = orbax_store(store.directory, 5).restore_newest(_state(0))
    assert step == 10 and _same(state, _state(10))  # the older one, bit for bit
    assert sorted(os.listdir(store.directory)) == ["10", "broken"]
    (moved,) = os.listdir(os.path.join(store.directory, "broken"))
    assert moved.startswith("20-")
    with open(os.path.join(store.directory, "broken", moved, "REASON.txt")) as f:
        assert reason in f.read()


def test_when_no_checkpoint_restores_nothing_is_moved_and_each_is_listed(tmp_path):
    store = _saved(tmp_path, [10, 20])
    for step in (10, 20):
        os.remove(os.path.join(store.path(step), DIGESTS))
    with pytest.raises(NoCheckpointRestores, match=r"holds 2 checkpoint\(s\) and none restores: 20/: .*; 10/: "):
        orbax_store(store.directory, 5).restore_newest(_state(0))
    assert sorted(os.listdir(store.directory)) == ["10", "20"]


def test_an_intact_checkpoint_of_another_model_is_refused_not_walked_past(tmp_path):
    store = _saved(tmp_path, [10])
    wider = _state(0, width=301)  # another architecture: one weight has another shape
    with pytest.raises(CheckpointMismatch, match=r"\['trainable'\]\[0\] is float32\[300, 40\] there and float32\[301"):
        orbax_store(store.directory, 5).restore_newest(wider)
    assert os.listdir(store.directory) == ["10"]  # not moved: it is not broken


def test_a_save_cut_short_is_replaced_when_the_step_is_saved_again(tmp_path):
    store = _saved(tmp_path, [10, 20])
    os.remove(os.path.join(store.path(20), DIGESTS))  # killed after orbax's rename, before the digests
    resumed = orbax_store(store.directory, 5)
    assert resumed.restore_newest(_state(0))[0] == 10
    resumed.save(20, _state(20))
    step, state = orbax_store(store.directory, 5).restore_newest(_state(0))
    assert step == 20 and _same(state, _state(20))


def test_why_the_store_checks_more_than_orbax_does(tmp_path):
    # The module's reasons, as measured: orbax alone restores a flipped data byte and a target of
    # another shape without an error. Should a later orbax refuse both, the digests and the
    # shape check could go.
    import orbax.checkpoint as ocp

    store = _saved(tmp_path, [10])
    path = _largest_file(store.path(10))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    restored = ocp.StandardCheckpointer().restore(store.path(10), _state(0))
    assert not _same(restored, _state(10))  # wrong values, no error
    store = _saved(tmp_path / "second", [10])
    restored = ocp.StandardCheckpointer().restore(store.path(10), _state(0, width=301))
    assert np.shape(restored["trainable"][0]) != (301, 40)  # not the target's shape, no error


class _Reporting:
    """A checkpointer whose save writes a traceback-like report to fd 2, as orbax's write threads do
    (from another thread, before the error reaches the caller), and then fails or succeeds."""

    def __init__(self, error):
        self.error = error

    def save(self, folder, state):
        import threading

        writer = threading.Thread(target=os.write, args=(2, b"Traceback (most recent call last): report\n"))
        writer.start()
        writer.join()
        if self.error:
            raise OSError(28, "No space left on device")
        os.makedirs(folder)

    def wait_until_finished(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("fails", [True, False])
def test_a_save_holds_back_what_its_threads_report_until_it_knows_how_it_ended(tmp_path, capfd, fails):
    store = orbax_store(str(tmp_path / "checkpoints"), 2)
    store.format._checkpointer = _Reporting(fails)
    if fails:
        saved = os.dup(2)
        with pytest.raises(OSError) as raised:
            store.save(10, _state(10))
        os.write(2, b"after the failure\n")  # the process's later reports stay muted too
        os.write(raised.value.stderr_fd, b"the one line\n")
        os.dup2(saved, 2)
        assert capfd.readouterr().err == "the one line\n"
    else:
        store.save(10, _state(10))
        assert capfd.readouterr().err == "Traceback (most recent call last): report\n"  # shown, not lost
