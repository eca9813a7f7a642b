"""A multi-worker run's cluster (TF_CONFIG): checked before anything starts, waited for with a word
every 30 s, and a lost worker named. Standard library only (TensorFlow is not needed to check).

    TF_CONFIG='{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}'

`read_tf_config` turns a bad TF_CONFIG into one line; `check_this_host` refuses a task whose
address is not this machine; `wait_for_peers` waits, before TensorFlow connects, until every
worker answers, naming those that do not every `peers.REPORT_SECONDS`, until a timeout; a lost
worker is named with `peers.unreachable`.
"""

import dataclasses
import json
import socket

from keras_mixer.training.peers import (
    REPORT_SECONDS,
    ClusterError,
    describe,
    drain,
    is_this_machine,
    listen,
    split_address,
    unreachable,
    wait_for,
)

JOBS = ("chief", "worker")  # the tasks that train; parameter servers and evaluators are not supported
EXAMPLE = '{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}'


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
        if not isinstance(addresses, list) or not all(isinstance(a, str) and split_address(a) for a in addresses):
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


def check_this_host(cluster):
    """ClusterError when this task's address does not resolve or is not this machine."""
    host, _ = split_address(cluster.address)
    task = f"{cluster.task_type} {cluster.task_index}"
    try:
        here = is_this_machine(host)
    except socket.gaierror as e:
        raise ClusterError(
            f"TF_CONFIG's task is {task} at {cluster.address}, and {host!r} does not resolve ({e})"
        ) from None
    if not here:
        raise ClusterError(
            f"TF_CONFIG's task is {task} at {cluster.address}, which is not this machine ({socket.gethostname()}): "
            f"give each machine the index of its own address in the cluster list"
        )


def wait_for_peers(cluster, timeout, report_every=REPORT_SECONDS, poll=0.5):
    """Returns once every other task's port accepts a connection; before TensorFlow connects.

    TensorFlow's MultiWorkerMirroredStrategy waits in C++ until every task registered, holding
    the interpreter (no Python thread runs, no Python signal handler) with its own SIGTERM handler
    ignoring SIGTERM. So the waiting happens here first, in Python (`peers.wait_for`): this task's
    port answers probes meanwhile (a listener on it, closed before TensorFlow binds it), so workers
    started in any order find each other. One line every `report_every` seconds names the tasks
    not reachable yet; after `timeout` seconds, ClusterError names them. SIGTERM and Ctrl-C stop
    the wait at once (ClusterError with `signum`). Nothing is written: the workdir and its lock
    come later."""
    task = f"{cluster.task_type} {cluster.task_index}"
    listener = listen(split_address(cluster.address)[1], f"TF_CONFIG's task {task} ({cluster.address})")
    print(
        f"Joining a {cluster.size}-task cluster as {task} ({cluster.address}); waiting for {describe(cluster.peers())}",
        flush=True,
    )

    def missing():
        drain(listener)
        return unreachable(cluster.peers(), timeout=poll)

    advice = (
        "Start every worker (the same command, each with its own TF_CONFIG task), check the addresses and firewalls"
    )
    try:
        wait_for(missing, timeout, advice, report_every, poll)
    finally:
        drain(listener)
        listener.close()
