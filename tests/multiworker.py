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


def run_cluster(command, workers=2, timeout=600, env=None):
    """Starts `command` once per worker with TF_CONFIG set; returns the finished Popen objects."""
    addresses = [f"localhost:{port}" for port in free_ports(workers)]
    processes = []
    for index in range(workers):
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        worker_env = {**os.environ, **(env or {}), "TF_CONFIG": json.dumps(tf_config)}
        processes.append(
            subprocess.Popen(command, env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return processes, outputs
