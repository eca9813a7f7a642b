"""The JAX-backend trainer over two hosts: two processes on localhost joined by jax.distributed, one
CPU device each, training data-parallel as one process over two devices does.

Each process is `trainers/pretrain.py` with KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES /
_PROCESS_ID set, as on GPU hosts; both are given the same --workdir (on localhost it is the shared
directory that orbax's multi-host checkpoints need). Cross-process collectives on CPU go through
gloo, jax's default `jax_cpu_collectives_implementation` (jax 0.10), so the trainer needs nothing
CPU-specific.

The recipe the runs share is the demo's with the three things off that make a host's stream differ
from its share of one host's stream: the shuffle buffer (1), the random crops (--crop_area_min 1;
the demo has no flips) and stochastic depth (--drop_path 0). With them on, each host shuffles and
crops its own shard (tf.distribute.InputContext), so two hosts train on other global batches than
one, by design, as the TF trainer's multi-worker runs do. With them off, the two hosts' halves of
every global batch are the one host's global batch in another row order (each full epoch: 1437
examples, 22 batches of 64), and the trainer rebuilds the stream each epoch.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from multiworker import free_ports
from runs import ENV, JAX, ROOT, metrics
from test_faults import snapshot

# 30 steps: over the first epoch's end (step 22), checkpoints at 10, 20 and 30, every loss logged.
ARGS = ["--steps", 30, "--log_every", 1, "--checkpoint_every", 10, "--seed", 0, "--noexport"]
ARGS += ["--write_worker_weights", "--shuffle_buffer", 1, "--crop_area_min", 1, "--drop_path", 0]
ARGS += ["--eval_resize", "resize"]  # the evaluation the trainer asks for without training crops
CPU = {**JAX, "JAX_PLATFORMS": "cpu"}
TIMEOUT = 300  # seconds for each group of processes (about 60 s here; 2-core Xeon, warm compile cache)


def _start(workdir, logs, env):
    """trainers/pretrain.py with ARGS in `workdir`, its output in the file `logs`."""
    command = [sys.executable, os.path.join(ROOT, "trainers", "pretrain.py"), *map(str, ARGS), "--workdir", workdir]
    with open(logs, "w") as out:  # files, not pipes: neither process can block on a full pipe
        return subprocess.Popen(command, env={**ENV, **env}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def _hosts(workdir, logs_dir, name, processes=2):
    """Env for process 0 .. processes - 1 of one jax.distributed run on a free localhost port."""
    [port] = free_ports(1)
    cluster = {
        **CPU,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"localhost:{port}",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": str(processes),
    }
    return [
        (workdir, logs_dir / f"{name}_{i}.log", {**cluster, "KERAS_DISTRIBUTION_PROCESS_ID": str(i)})
        for i in range(processes)
    ]


def _run(*jobs):
    """Starts every (workdir, logs, env) at once; waits at most TIMEOUT seconds in all, kills what
    is left (also when the test fails) and returns [(return code, output)] in order."""
    processes = []
    try:
        for job in jobs:
            processes.append(_start(*job))
        deadline = time.monotonic() + TIMEOUT
        for process in processes:
            try:
                process.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    outputs = [open(logs).read() for _, logs, _ in jobs]
    return [(process.returncode, output) for process, output in zip(processes, outputs)]


def _check(results):
    for i, (code, output) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{output[-4000:]}"
    return [output for _, output in results]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two-host workdir, one-host workdir, the two hosts' outputs, the one host's output, seconds):
    the two processes and the one-process run over two devices, all started together."""
    base = tmp_path_factory.mktemp("multihost")
    one_host = (base / "one", base / "one.log", {**CPU, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    started = time.perf_counter()
    results = _check(_run(*_hosts(base / "two", base, "host"), one_host))
    return base / "two", base / "one", results[:2], results[2], time.perf_counter() - started


def _weights(path):
    with np.load(path) as f:
        return {key: f[key] for key in f.files}


@pytest.mark.slow  # three JAX processes at once, about 60 s
def test_two_processes_train_as_two_replicas_of_one_model(runs):
    two, _, (chief, other), _, _ = runs
    assert "DataParallel over 2 device(s) on 2 host(s)" in chief
    assert "host(s)" not in other  # the chief alone reports, writes the workdir and checkpoints
    m = metrics(two)
    assert m["finished"] and m["step"] == 30 and m["replicas"] == 2 and m["strategy"] == "jax data-parallel"
    assert [step for step, _ in m["loss_history"]] == list(range(1, 31))
    assert m["loss_history"][-1][1] < 0.7 * m["loss_history"][0][1]  # it trained
    assert sorted(os.listdir(two / "checkpoints")) == ["10", "20", "30"]
    # Both processes wrote their shard of each checkpoint into the one directory.
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(two / "checkpoints" / "30"))
    assert sorted(os.listdir(two / "worker_1")) == ["final_weights.npz"]  # the non-chief wrote only this
    chief_weights, other_weights = _weights(two / "final_weights.npz"), _weights(two / "worker_1" / "final_weights.npz")
    assert list(chief_weights) == list(other_weights)
    for key in chief_weights:  # replicas: the same all-reduced update on each, bit for bit
        np.testing.assert_array_equal(other_weights[key], chief_weights[key], err_msg=key)


@pytest.mark.slow
def test_two_hosts_take_the_steps_of_one_host_with_two_devices(runs):
    two, one, _, one_output, _ = runs
    assert "DataParallel over 2 device(s) on 1 host(s)" in one_output
    m2, m1 = metrics(two), metrics(one)
    assert m1["replicas"] == m2["replicas"] == 2
    # The same global batches and the same step; only the sums run in another order (the mean over
    # two hosts' rows in another row order, the gradients all-reduced through gloo). Measured: 30
    # losses within 1.1e-7 relative (float32 rounding, 2.4e-7 absolute), so rtol 1e-5 as in
    # tests/test_jax_data_parallel.py; any other batch moves a loss by 1e-4 from step 3 on.
    losses = [np.array(m["loss_history"]) for m in (m1, m2)]
    np.testing.assert_array_equal(losses[1][:, 0], losses[0][:, 0])
    np.testing.assert_allclose(losses[1][:, 1], losses[0][:, 1], rtol=1e-5)
    # Equal here; weights 1e-7 apart may still move one borderline image of the 360 elsewhere.
    for key in ("eval_top1", "eval_top5"):
        assert abs(m2[key] - m1[key]) <= 1 / 360 + 1e-9, key
    a, b = _weights(one / "final_weights.npz"), _weights(two / "final_weights.npz")
    assert list(a) == list(b)
    noise = [key for key in a if key.endswith("token_mixing/Dense_1/bias")]
    assert len(noise) == 4  # one per block of T/2
    for key in a:
        if key in noise:
            # A per-token bias added equally to every channel, and every path from the residual
            # stream passes a LayerNorm over the channels, which subtracts it: its gradient is 0,
            # its value rounding noise that Adam scales up to ~a learning-rate step (measured: at
            # most 1.4e-5, the two runs 1.9e-5 apart; Adam's worst case, the summed learning rate,
            # is 1.4e-2). Only bounded: noise-sized in both runs.
            assert np.abs(a[key]).max() < 1e-4 and np.abs(b[key]).max() < 1e-4, key
        else:
            # Measured: 1.2e-7 apart at most after 30 AdamW steps (2.1e-5 relative on weights over 1e-3).
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.slow  # two more processes, about 20 s
def test_a_finished_two_host_run_is_finished_on_both(runs, tmp_path):
    two = runs[0]
    before = snapshot(two)
    chief, other = _check(_run(*_hosts(two, tmp_path, "again")))
    assert "already finished at step 30" in chief
    assert "already finished" not in other and "XLA compiles" not in other
    assert snapshot(two) == before  # nothing trained, nothing rewritten
