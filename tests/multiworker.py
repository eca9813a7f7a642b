"""Runs a command as a local two-worker TF_CONFIG cluster on free localhost ports (test helper)."""

import json
import os
import socket
import subprocess


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_cluster(command, addresses, env=None):
    """Starts `command` once per address, each with its TF_CONFIG task; returns the Popen objects
    (stdout and stderr piped apart, text)."""
    processes = []
    for index in range(len(addresses)):
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        worker_env = {**os.environ, **(env or {}), "TF_CONFIG": json.dumps(tf_config)}
        processes.append(
            subprocess.Popen(command, env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return processes


def finish(processes, timeout=600):
    """[(stdout, stderr)] of each process once it ended; kills them all after `timeout` seconds."""
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return outputs


def run_cluster(command, workers=2, timeout=600, env=None, addresses=None):
    """Runs `command` as a local cluster (on `addresses`, else free ports); returns the finished
    Popen objects and each one's stdout followed by its stderr."""
    addresses = addresses or [f"localhost:{port}" for port in free_ports(workers)]
    processes = start_cluster(command, addresses, env)
    return processes, [out + err for out, err in finish(processes, timeout)]
