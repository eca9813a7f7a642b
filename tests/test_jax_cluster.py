"""A JAX-backend run over several hosts, at its start: Keras' KERAS_DISTRIBUTION_* variables checked
in one line each, and the processes meeting before jax.distributed connects them, with a word
every interval, a timeout named on every process, and a refusal of a process that does not belong.
The processes are threads here (the trainer's processes: tests/test_jax_multihost_faults.py);
localhost ports where nothing listens stand for processes that never start; every wait is bounded."""

import socket
import threading
import time

import pytest
from multiworker import free_ports

from keras_mixer.training.jax.cluster import Hosts, Presence, check_coordinator, join, read_environment
from keras_mixer.training.peers import ClusterError, unreachable

COUNT, ID, ADDRESSES = (
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
)


def _env(addresses="localhost:1234", count="2", process_id="0"):
    return {key: value for key, value in {ADDRESSES: addresses, COUNT: count, ID: process_id}.items() if value}


@pytest.mark.parametrize(
    "environ, message",
    [
        (_env(count="two"), r"KERAS_DISTRIBUTION_NUM_PROCESSES='two' is not a whole number: expected the number of"),
        (_env(count="0"), r"KERAS_DISTRIBUTION_NUM_PROCESSES=0 is not a number of processes: expected 1 or more"),
        (_env(count=""), r"KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_PROCESS_ID set but not KERAS_DIS"),
        (_env(process_id="first"), r"KERAS_DISTRIBUTION_PROCESS_ID='first' is not a whole number: expected this "),
        (_env(process_id="2"), r"PROCESS_ID=2 is out of range: the run has 2 process\(es\) .*, so 0 to 1"),
        (_env(process_id="-1"), r"PROCESS_ID=-1 is out of range"),
        (_env(process_id=""), r"KERAS_DISTRIBUTION_PROCESS_ID is not set: each of the 2 processes needs its own"),
        (_env(addresses=""), r"KERAS_DISTRIBUTION_JOB_ADDRESSES is not set: give the coordinator's"),
        (_env(addresses="10.0.0.1"), r"'10.0.0.1' is not \"host:port\""),
        (_env(addresses="a:1,b:99999"), r"'b:99999' is not \"host:port\""),
        (_env(addresses="a:1,b:2,c:3"), r"lists 3 addresses but KERAS_DISTRIBUTION_NUM_PROCESSES is 2"),
    ],
)
def test_a_bad_keras_distribution_value_is_one_line_naming_it(environ, message):
    with pytest.raises(ClusterError, match=message) as raised:
        read_environment(environ)
    assert "\n" not in str(raised.value)


def test_good_values_name_every_process_and_one_process_is_no_cluster():
    hosts = read_environment(_env(addresses=" a:1 , b:2 ", process_id="1"))
    assert hosts == Hosts("a:1", 2, 1, ("a:1", "b:2")) and hosts.others() == [0]
    assert hosts.peers([0, 1]) == [("process 0", "a:1"), ("process 1", "b:2")]
    alone = read_environment(_env(addresses="a:1", count="3", process_id="2"))
    assert alone.peers([0, 1]) == [("process 0", "a:1"), ("process 1", "")]  # only the coordinator's is known
    assert read_environment({}) is None
    assert read_environment(_env(count="1", process_id="0")) is None  # one process: nothing to join
    assert read_environment({COUNT: "1"}) is None


def test_process_0_must_be_on_the_coordinators_machine():
    # 192.0.2.0/24 is reserved for documentation: never an address of this machine.
    with pytest.raises(ClusterError, match=r"this is process 0 .* at 192.0.2.7:1234, which is not this machine"):
        check_coordinator(Hosts("192.0.2.7:1234", 2, 0))
    check_coordinator(Hosts("192.0.2.7:1234", 2, 1))  # another process only connects to it
    check_coordinator(Hosts("localhost:1234", 2, 0))
    with pytest.raises(ClusterError, match=r"'no-such-host.invalid' does not resolve"):
        check_coordinator(Hosts("no-such-host.invalid:1234", 2, 1))


def _join_all(timeouts, count, port, **kwargs):
    """join() of each process id of `timeouts` ({id: seconds}) at once, each in a thread; {id: None
    or the error}."""
    results = {}

    def one(i):
        try:
            join(Hosts(f"localhost:{port}", count, i), timeouts[i], **kwargs)
            results[i] = None
        except ClusterError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in timeouts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(timeouts.values()) + 15)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_every_process_goes_once_all_joined_and_the_port_is_free_again():
    [port] = free_ports(1)
    started = time.monotonic()
    assert _join_all({2: 30, 0: 30, 1: 30}, 3, port, poll=0.1) == {0: None, 1: None, 2: None}
    assert time.monotonic() - started < 5
    with socket.socket() as service:  # jax.distributed's coordination service takes the port next
        service.bind(("", port))


def test_waiting_names_the_missing_process_each_interval_then_every_process_stops(capsys):
    [port] = free_ports(1)
    started = time.monotonic()
    # Process 2 would wait longer: the coordinator's timeout ends it.
    results = _join_all({0: 2.0, 2: 30}, 3, port, report_every=0.6, poll=0.1)
    assert 2.0 <= time.monotonic() - started < 6
    assert "did not form in 2 s (--cluster_timeout): not joined: process 1. Start every process" in str(results[0])
    assert str(results[2]).startswith(f"the coordinator (process 0, localhost:{port}) gave up: the cluster did not")
    waiting = [line for line in capsys.readouterr().out.splitlines() if line.startswith("waiting for the cluster")]
    assert 2 <= len(waiting) and all(
        line.startswith("waiting for the cluster: process 1 not joined yet") for line in waiting
    )


def test_a_coordinator_that_never_starts_is_named_with_its_address():
    [port] = free_ports(1)
    [error] = _join_all({1: 1.0}, 2, port, poll=0.1).values()
    assert f"not joined: process 0 (localhost:{port})" in str(error)


def test_a_process_of_another_run_is_refused_and_a_stray_connection_ignored():
    [port] = free_ports(1)
    coordinator = threading.Thread(target=join, args=(Hosts(f"localhost:{port}", 2, 0), 20), kwargs=dict(poll=0.1))
    coordinator.start()
    deadline = time.monotonic() + 10
    while not unreachable([("process 0", f"localhost:{port}")]) == []:
        assert time.monotonic() < deadline
    with socket.create_connection(("localhost", port)) as stray:  # a port scan, a health check
        stray.sendall(b"GET / HTTP/1.0\r\n\r\n")
    with pytest.raises(ClusterError, match="refused this process: it says the run has 3 processes, the coordinator"):
        join(Hosts(f"localhost:{port}", 3, 1), 5, poll=0.1)  # started with another NUM_PROCESSES
    join(Hosts(f"localhost:{port}", 2, 1), 5, poll=0.1)
    coordinator.join(5)
    assert not coordinator.is_alive()


def test_a_presence_answers_while_open_and_is_refused_once_closed():
    presence = Presence(towards="localhost")
    host, port = presence.address.rsplit(":", 1)
    assert host == "127.0.0.1" and unreachable([("process 1", presence.address)]) == []
    presence.socket.close()
    assert unreachable([("process 1", presence.address)]) == [("process 1", presence.address)]


class _Store:
    def newest_intact(self):
        return "/runs/r/checkpoints/20"


def _engine(presences):
    from keras_mixer.training.jax.engine import JaxEngine

    engine = JaxEngine()
    engine.presences, engine.store = presences, _Store()
    return engine


def _running(engine, error):
    """What leaves the engine's `running` context when `error` is raised inside it."""
    report = type("Report", (), {"metrics": {"step": 37}})()
    try:
        with engine.running(report):
            raise error
    except BaseException as e:  # noqa: BLE001 (the test looks at whatever comes out)
        return e


def test_an_error_while_a_peer_is_gone_names_it_whatever_its_type_and_a_muted_save_keeps_its_stream():
    from keras_mixer.training.stops import TrainingStopped, WorkerLost

    gone, alive = Presence(towards="localhost"), Presence(towards="localhost")
    gone.socket.close()
    engine = _engine({1: gone.address, 2: alive.address})
    # As a save that failed on a collective reaches the loop: orbax muted standard error (stderr_fd).
    failed_save = ValueError("UNKNOWN: Gloo AllGather failed: [pair.cc:538] Read error: Connection reset by peer")
    failed_save.stderr_fd = 7
    lost = _running(engine, failed_save)
    assert isinstance(lost, WorkerLost) and lost.hard_exit and lost.stderr_fd == 7
    assert str(lost).startswith("lost process 1 (127.0.0.1) after step 37 (ValueError: UNKNOWN: Gloo AllGather failed")
    assert "Newest checkpoint that restores: /runs/r/checkpoints/20. Start every process again" in str(lost)
    assert isinstance(_running(engine, RuntimeError("DEADLINE_EXCEEDED: barrier")), WorkerLost)
    # Every process stops together on these: a peer already gone is no lost process.
    stopped = TrainingStopped("stopped", 15)
    assert _running(engine, stopped) is stopped


def test_an_error_while_every_peer_answers_is_the_error_itself():
    alive = Presence(towards="localhost")
    bug = KeyError("a bug")
    started = time.monotonic()
    assert _running(_engine({1: alive.address}), bug) is bug
    assert time.monotonic() - started < 5  # the probes settle for 2 s at most
    assert _running(_engine({}), bug) is bug  # one host: nothing to probe
