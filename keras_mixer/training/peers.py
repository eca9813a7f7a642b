"""The processes of a run that spans machines, as the network sees them: their "host:port"
addresses, whether one is this machine, whether one still answers, and the wait at start for every
one of them with a line every `REPORT_SECONDS`. Standard library only: both engines' clusters use
it (`tf.cluster` for TF_CONFIG workers, `jax.cluster` for jax.distributed processes), before
TensorFlow or JAX connects anything.
"""

import errno
import signal
import socket
import threading
import time

REPORT_SECONDS = 30.0


class ClusterError(ValueError):
    """The cluster cannot start as configured (one line); with `signum`, a signal stopped the wait."""

    def __init__(self, message, signum=None):
        super().__init__(message)
        if signum is not None:
            self.signum = signum


def split_address(address):
    """(host, port) of "host:port" ("[::1]:2222" too), or None."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def is_this_machine(host):
    """Whether `host` (a name or an address) is an address of this machine; OSError (socket.gaierror)
    when it does not resolve."""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    return any(_bindable(address) for address in addresses)


def _bindable(address):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((address, 0))
            return True
        except OSError:
            return False


def unreachable(peers, timeout=1.0):
    """The (name, address) of `peers` whose port does not accept a connection."""
    missing = []
    for name, address in peers:
        try:
            socket.create_connection(split_address(address), timeout=timeout).close()
        except OSError:
            missing.append((name, address))
    return missing


def describe(peers):
    """ "worker 1 (host2:2222), worker 2 (host3:2222)": (name, address) pairs as one phrase."""
    return ", ".join(f"{name} ({address})" if address else name for name, address in peers)


def listen(port, owner):
    """A non-blocking listener on `port` of every interface; ClusterError naming `owner` (e.g.
    "TF_CONFIG's task worker 0 (host:2222)") when another process holds the port."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
    except OSError as e:
        listener.close()
        if e.errno != errno.EADDRINUSE:
            raise
        raise ClusterError(
            f"port {port} of {owner} is in use on this machine: is a process of an earlier run still running? "
            f"(`ss -ltnp 'sport = :{port}'` names it)"
        ) from None
    listener.listen(64)
    listener.setblocking(False)
    return listener


def drain(listener):
    """Accepts and closes the probes waiting on `listener` (a full backlog would stop answering)."""
    while True:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        connection.close()


def wait_for(missing, timeout, advice, report_every=REPORT_SECONDS, poll=0.5, absent_means="not reachable"):
    """Calls `missing()` (the (name, address) pairs not there yet) every `poll` seconds until it is
    empty. One line every `report_every` seconds names them ("... `absent_means` yet"); after
    `timeout` seconds, ClusterError names them with `advice` (what to start or check). SIGTERM and
    Ctrl-C stop the wait at once (ClusterError with `signum`). The caller has written nothing yet."""
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
            absent = missing()
            if not absent:
                return
            waited = time.monotonic() - started
            if waited >= timeout:
                raise ClusterError(
                    f"the cluster did not form in {timeout:.0f} s (--cluster_timeout): {absent_means}: "
                    f"{describe(absent)}. {advice}, or wait longer with --cluster_timeout. Nothing was written."
                )
            if time.monotonic() >= next_report:
                next_report += report_every
                print(
                    f"waiting for the cluster: {describe(absent)} {absent_means} yet "
                    f"({waited:.0f} s of {timeout:.0f} s, --cluster_timeout)",
                    flush=True,
                )
            time.sleep(poll)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
