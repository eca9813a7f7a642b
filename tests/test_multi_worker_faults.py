"""A two-worker TF_CONFIG cluster on localhost under the faults clusters meet: a worker lost by
kill -9, and a worker preempted by SIGTERM. Each run is the demo recipe, 60 steps; every wait is
bounded and every process is killed at the end of its test."""

import os
import signal
import sys
import time

import numpy as np
import pytest
from multiworker import finish, free_ports, start_cluster
from runs import ENV, ROOT, metrics

pytestmark = pytest.mark.slow

ARGS = ["--steps", "60", "--checkpoint_every", "20", "--log_every", "10", "--seed", "0", "--noexport"]


def _command(workdir, *extra):
    return [sys.executable, os.path.join(ROOT, "trainers", "pretrain.py"), *ARGS, *extra, "--workdir", str(workdir)]


def _addresses():
    return [f"localhost:{port}" for port in free_ports(2)]


def _wait_for(path, processes, seconds=300):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        assert time.time() < deadline, f"{path} did not appear in time"
        assert all(p.poll() is None for p in processes), "a worker ended early"
        time.sleep(0.05)


def _weights(path):
    return np.load(path)


def test_a_lost_worker_stops_the_other_in_seconds_and_both_resume_to_the_uninterrupted_weights(tmp_path):
    straight = tmp_path / "straight"
    uninterrupted = start_cluster(_command(straight, "--write_worker_weights"), _addresses(), ENV)
    outputs = finish(uninterrupted)
    assert [p.returncode for p in uninterrupted] == [0, 0], outputs
    chief, other = _weights(straight / "final_weights.npz"), _weights(straight / "worker_1" / "final_weights.npz")
    for key in chief.files:  # both workers hold one model
        np.testing.assert_array_equal(chief[key], other[key])
    assert metrics(straight)["replicas"] == 2 and metrics(straight)["strategy"] == "multi_worker"

    run, addresses = tmp_path / "run", _addresses()
    processes = start_cluster(_command(run), addresses, ENV)
    try:
        _wait_for(run / "checkpoints" / "ckpt-20.index", processes)
        processes[1].kill()  # kill -9 of worker 1
        lost = time.monotonic()
        out, err = processes[0].communicate(timeout=60)
        took = time.monotonic() - lost
    finally:
        for p in processes:
            p.kill()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert processes[0].returncode == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert took < 20 and f"lost worker 1 ({addresses[1]}) after step" in lines[0]
    assert f"Newest checkpoint that restores: {run / 'checkpoints'}/ckpt-" in lines[0]

    restarted = start_cluster(_command(run, "--write_worker_weights"), addresses, ENV)
    outputs = finish(restarted)
    assert [p.returncode for p in restarted] == [0, 0], outputs
    assert "Resumed from step" in outputs[0][0] and metrics(run)["resumed_from_step"] >= 20
    resumed = _weights(run / "final_weights.npz")
    for key in chief.files:  # same seed, deterministic ops: bit-identical
        np.testing.assert_array_equal(resumed[key], chief[key])


def test_sigterm_to_one_worker_makes_every_worker_save_one_step_and_exit_143_then_both_resume_there(tmp_path):
    run, addresses = tmp_path / "run", _addresses()
    processes = start_cluster(_command(run, "--checkpoint_every", "1000"), addresses, ENV)
    try:
        deadline = time.time() + 300
        line = ""
        while not line.startswith("step 10/60"):  # mid-run, before any periodic checkpoint (1000)
            line = processes[0].stdout.readline()
            assert line and time.time() < deadline, "the chief ended before step 10"
        processes[1].send_signal(signal.SIGTERM)
        outputs = finish(processes, timeout=60)
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [143, 143], outputs
    saved = []
    for _, err in outputs:
        [stopped] = [line for line in err.splitlines() if line.startswith("stopped: ")]
        saved.append(int(stopped.split("every worker saved step ")[1].split()[0]))
        assert "Traceback" not in err
    assert "stopped: SIGTERM: every worker saved step" in outputs[1][1]
    assert "another worker of the cluster was preempted" in outputs[0][1]
    step = saved[0]
    assert saved == [step, step] and 10 <= step < 60 and (run / "checkpoints" / f"ckpt-{step}.index").exists()
    assert metrics(run)["step"] == step and not metrics(run)["finished"]

    restarted = start_cluster(_command(run, "--checkpoint_every", "1000"), addresses, ENV)
    outputs = finish(restarted)
    assert [p.returncode for p in restarted] == [0, 0], outputs
    assert f"Resumed from step {step}" in outputs[0][0] and metrics(run)["finished"]
