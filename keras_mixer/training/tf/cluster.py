"""A multi-worker run's cluster (TF_CONFIG): checked before anything starts, waited for with a word
every 30 s, and a lost worker named. Standard library only (TensorFlow is not needed to check).

    TF_CONFIG='{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}'

`read_tf_config` turns a bad TF_CONFIG into one line; `check_this_host` refuses a task whose
address is not this machine; `wait_for_peers` waits, before TensorFlow connects, until every
worker answers, naming those that do not every `REPORT_SECONDS`, until a timeout; `unreachable`
names the workers whose port no longer answers (a lost worker).
"""

import dataclasses
import errno
import json
import signal
import socket
import threading
import time

REPORT_SECONDS = 30.0
JOBS = ("chief", "worker")  # the tasks that train; parameter servers and evaluators are not supported
EXAMPLE = '{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}'


class ClusterError(ValueError):
    """The cluster cannot start as configured (one line); with `signum`, a signal stopped the wait."""

    def __init__(self, message, signum=None):
        super().__init__(message)
        if signum is not None:
            self.signum = signum


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The cluster of a TF_CONFIG and this process's task in it."""

    jobs: dict  # {"chief": ["host:port"], "worker": ["host:port", ...]}
    task_type: str
    task_index: int

    @property
    def address(self):
        return self.jobs[self.task_type][self.task_index]

    @property
    def size(self):
        return sum(len(addresses) for addresses in self.jobs.values())

    def tasks(self):
        """[(name, address)] of every task, e.g. ("worker 1", "host2:2222")."""
        return [(f"{job} {i}", address) for job in JOBS for i, address in enumerate(self.jobs.get(job, []))]

    def peers(self):
        return [(name, address) for name, address in self.tasks() if name != f"{self.task_type} {self.task_index}"]


def read_tf_config(text):
    """The `Cluster` of a TF_CONFIG string; None for '' or None; one line when it is
    not what TensorFlow needs: not JSON, no cluster or task, an index out of range... (ClusterError, a ValueError)"""
    if not text:
        return None
    expected = f"expected e.g. {EXAMPLE}"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        problem = f"{e.msg} at character {e.pos}"
        raise ClusterError(f"TF_CONFIG is not valid JSON ({problem}): {text[:120]!r}; {expected}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not any(cluster.get(job) for job in JOBS):
        raise ClusterError(f"TF_CONFIG has no cluster with chief or worker addresses: {text[:120]!r}; {expected}")
    for job, addresses in cluster.items():
        if job not in JOBS:
            raise ClusterError(f"TF_CONFIG's cluster has a {job!r} job; this trainer runs chief and worker tasks only")
        if not isinstance(addresses, list) or not all(isinstance(a, str) and _split(a) for a in addresses):
            raise ClusterError(f'TF_CONFIG\'s {job} list must be "host:port" strings, not {addresses!r}')
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ClusterError(
            f'TF_CONFIG has no task ({{"type": "worker", "index": N}}): each worker needs its own; {expected}'
        )
    task_type, index = task["type"], task["index"]
    if task_type not in cluster:
        raise ClusterError(f"TF_CONFIG's task type {task_type!r} is not a job of its cluster ({', '.join(cluster)})")
    count = len(cluster[task_type])
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
        raise ClusterError(
            f"TF_CONFIG's task index {index!r} is out of range: the cluster has {count} {task_type} task(s), "
            f"index 0 to {count - 1}"
        )
    return Cluster({job: list(cluster[job]) for job in JOBS if cluster.get(job)}, task_type, index)


def _split(address):
    """(host, port) of "host:port" ("[::1]:2222" too), or None."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def check_this_host(cluster):
    """ClusterError when this task's address does not resolve or is not this machine."""
    host, _ = _split(cluster.address)
    task = f"{cluster.task_type} {cluster.task_index}"
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror as e:
        where = f"TF_CONFIG's task is {task} at {cluster.address}"
        raise ClusterError(f"{where}, and {host!r} does not resolve ({e})") from None
    if not any(_local(address) for address in addresses):
        raise ClusterError(
            f"TF_CONFIG's task is {task} at {cluster.address}, which is not this machine ({socket.gethostname()}): "
            f"give each machine the index of its own address in the cluster list"
        )


def _local(address):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((address, 0))
            return True
        except OSError:
            return False


def unreachable(tasks, timeout=1.0):
    """The (name, address) of `tasks` whose port does not accept a connection."""
    missing = []
    for name, address in tasks:
        try:
            socket.create_connection(_split(address), timeout=timeout).close()
        except OSError:
            missing.append((name, address))
    return missing


def describe(tasks):
    return ", ".join(f"{name} ({address})" for name, address in tasks)


def wait_for_peers(cluster, timeout, report_every=REPORT_SECONDS, poll=0.5):
    """Returns once every other task's port accepts a connection; before TensorFlow connects.

    TensorFlow's MultiWorkerMirroredStrategy waits in C++ until every task registered, holding
    the interpreter (no Python thread runs, no Python signal handler) with its own SIGTERM handler
    ignoring SIGTERM. So the waiting happens here first, in Python: this task's port answers
    probes meanwhile (a listener on it, closed before TensorFlow binds it), so workers started in
    any order find each other. One line every `report_every` seconds names the tasks not reachable
    yet; after `timeout` seconds, ClusterError names them. SIGTERM and Ctrl-C stop the wait at
    once (ClusterError with `signum`). Nothing is written: the workdir and its lock come later."""
    task = f"{cluster.task_type} {cluster.task_index}"
    _, port = _split(cluster.address)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
    except OSError as e:
        listener.close()
        if e.errno != errno.EADDRINUSE:
            raise
        raise ClusterError(
            f"port {port} of TF_CONFIG's task {task} ({cluster.address}) is in use on this machine: is a worker of "
            f"an earlier run still running? (`ss -ltnp 'sport = :{port}'` names the process)"
        ) from None
    listener.listen(64)
    listener.setblocking(False)
    print(
        f"Joining a {cluster.size}-task cluster as {task} ({cluster.address}); waiting for {describe(cluster.peers())}",
        flush=True,
    )
    started = time.monotonic()
    next_report = started + min(report_every, max(timeout / 2, 1.0))

    def stop(signum, frame):
        raise ClusterError(
            f"{signal.Signals(signum).name} while waiting {time.monotonic() - started:.0f} s for the cluster; "
            f"nothing was written",
            signum,
        )

    main = threading.current_thread() is threading.main_thread()
    previous = {n: signal.signal(n, stop) for n in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        while True:
            _drain(listener)
            missing = unreachable(cluster.peers(), timeout=poll)
            if not missing:
                return
            waited = time.monotonic() - started
            if waited >= timeout:
                raise ClusterError(
                    f"the cluster did not form in {timeout:.0f} s (--cluster_timeout): not reachable: "
                    f"{describe(missing)}. Start every worker (the same command, each with its own TF_CONFIG task), "
                    f"check the addresses and firewalls, or wait longer with --cluster_timeout. Nothing was written."
                )
            if time.monotonic() >= next_report:
                next_report += report_every
                print(
                    f"waiting for the cluster: {describe(missing)} not reachable yet "
                    f"({waited:.0f} s of {timeout:.0f} s, --cluster_timeout)",
                    flush=True,
                )
            time.sleep(poll)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _drain(listener)
        listener.close()


def _drain(listener):
    """Accepts and closes the probes waiting on `listener` (a full backlog would stop answering)."""
    while True:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        connection.close()
