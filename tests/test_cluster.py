"""A multi-worker run's start: TF_CONFIG checked in one line, peers waited for with a word every
interval, a timeout, and SIGTERM / Ctrl-C at once. Localhost ports where nothing listens stand for
workers that do not answer; every wait here is bounded."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from multiworker import free_ports
from runs import ENV, ROOT, error_lines

from keras_mixer.training.tf.cluster import ClusterError, check_this_host, read_tf_config, wait_for_peers


def _config(workers, index=0, **task):
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index, **task}})


@pytest.mark.parametrize(
    "text, message",
    [
        ("{nope", r"TF_CONFIG is not valid JSON \(Expecting property name"),
        ('{"task": {"type": "worker", "index": 0}}', "TF_CONFIG has no cluster with chief or worker addresses"),
        ('{"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker", "index": 0}}', 'must be "host:port"'),
        ('{"cluster": {"worker": ["a:1"], "ps": ["c:3"]}, "task": {"type": "worker", "index": 0}}', "'ps' job"),
        ('{"cluster": {"worker": ["a:1", "b:2"]}}', "TF_CONFIG has no task"),
        (
            _config(["a:1", "b:2"], index=2),
            r"task index 2 is out of range: the cluster has 2 worker task\(s\), index 0 to 1",
        ),
        (_config(["a:1", "b:2"], index="1"), "task index '1' is out of range"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "task type 'chief' is not a job"),
    ],
)
def test_a_bad_tf_config_is_one_line_saying_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message) as raised:
        read_tf_config(text)
    assert "\n" not in str(raised.value)


def test_a_good_tf_config_names_every_task_and_this_ones_peers():
    cluster = read_tf_config(
        json.dumps(
            {"cluster": {"chief": ["c:1"], "worker": ["w:2", "[::1]:3"]}, "task": {"type": "worker", "index": 1}}
        )
    )
    assert cluster.size == 3 and cluster.address == "[::1]:3"
    assert cluster.peers() == [("chief 0", "c:1"), ("worker 0", "w:2")]
    assert read_tf_config("") is None and read_tf_config(None) is None


def test_a_task_whose_address_is_another_machine_is_refused():
    # 192.0.2.0/24 is reserved for documentation: never an address of this machine.
    with pytest.raises(ClusterError, match=r"worker 1 at 192.0.2.7:2222, which is not this machine"):
        check_this_host(read_tf_config(_config(["localhost:2222", "192.0.2.7:2222"], index=1)))
    check_this_host(read_tf_config(_config(["localhost:2222", "192.0.2.7:2222"], index=0)))  # this machine


def test_waiting_names_the_missing_worker_each_interval_then_times_out(capsys):
    mine, theirs = free_ports(2)
    cluster = read_tf_config(_config([f"localhost:{mine}", f"localhost:{theirs}"]))
    started = time.monotonic()
    with pytest.raises(ClusterError) as raised:
        wait_for_peers(cluster, timeout=2.0, report_every=0.6, poll=0.1)
    assert 2.0 <= time.monotonic() - started < 6
    assert f"not reachable: worker 1 (localhost:{theirs})" in str(raised.value) and "--cluster_timeout" in str(
        raised.value
    )
    waiting = [line for line in capsys.readouterr().out.splitlines() if line.startswith("waiting for the cluster")]
    assert 2 <= len(waiting) <= 4 and all(f"worker 1 (localhost:{theirs}) not reachable yet" in w for w in waiting)


def test_waiting_ends_when_the_peer_answers_and_a_busy_port_is_named():
    mine, theirs = free_ports(2)
    cluster = read_tf_config(_config([f"localhost:{mine}", f"localhost:{theirs}"]))
    with socket.socket() as peer:  # the other worker, listening
        peer.bind(("", theirs))
        peer.listen()
        started = time.monotonic()
        wait_for_peers(cluster, timeout=30, poll=0.1)
        assert time.monotonic() - started < 5
    with socket.socket() as squatter:  # this worker's own port, held by another process's socket
        squatter.bind(("", mine))
        squatter.listen()
        with pytest.raises(
            ClusterError, match=f"port {mine} of TF_CONFIG's task worker 0 .* is in use on this machine"
        ):
            wait_for_peers(cluster, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_trainer_waiting_for_its_cluster_stops_at_once_on_a_signal_and_writes_nothing(tmp_path, stop):
    mine, theirs = free_ports(2)
    env = {**ENV, "TF_CONFIG": _config([f"localhost:{mine}", f"localhost:{theirs}"])}
    command = [sys.executable, os.path.join(ROOT, "trainers", "pretrain.py"), "--workdir", str(tmp_path / "run")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        waiting = process.stdout.readline()
        while "Joining a 2-task cluster" not in waiting:  # the trainer's first lines, then the wait
            waiting = process.stdout.readline()
            assert waiting, "the trainer ended before it waited"
        time.sleep(1)
        signalled = time.monotonic()
        process.send_signal(stop)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert time.monotonic() - signalled < 5
    assert process.returncode == 128 + stop and f"stopped: {stop.name} while waiting" in err, err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_trainer_whose_cluster_never_forms_exits_with_one_line_and_no_workdir(tmp_path):
    mine, theirs = free_ports(2)
    env = {"TF_CONFIG": _config([f"localhost:{mine}", f"localhost:{theirs}"])}
    from runs import trainer

    result = trainer("pretrain", "--workdir", tmp_path / "run", "--cluster_timeout", 3, check=False, env=env)
    [line] = error_lines(result)
    assert result.returncode == 1 and f"worker 1 (localhost:{theirs})" in line and "did not form in 3 s" in line
    assert not (tmp_path / "run").exists()  # no workdir, so no lock left behind
    bad = trainer("pretrain", "--workdir", tmp_path / "run", check=False, env={"TF_CONFIG": _config(["a:1"], index=3)})
    assert bad.returncode == 1 and len(error_lines(bad)) == 1 and "task index 3 is out of range" in bad.stderr
