"""A JAX-backend run over several hosts (jax.distributed): its processes read from Keras'
environment variables in one line each, waited for at start with a word every 30 s, and
reachable afterwards, so that a lost one can be named.

    KERAS_DISTRIBUTION_JOB_ADDRESSES=10.0.0.1:1234   (process 0's, the coordinator; or every
                                                      process's, in process-id order)
    KERAS_DISTRIBUTION_NUM_PROCESSES=2
    KERAS_DISTRIBUTION_PROCESS_ID=0                   (each process its own, 0 .. N-1)

Why the wait is ours and not jax.distributed's: `jax.distributed.initialize` waits in C++ without
a word, ignores Python's signal handlers meanwhile, and at its timeout ends the process with a
fatal log line (SIGABRT), not an exception (measured, jax 0.10.2: a process 0 whose peer never
starts). So every process first meets the others in Python (`join`): process 0 listens on the
coordinator's port, the others connect to it and say who they are; process 0 names the missing
ones every `peers.REPORT_SECONDS`, and tells every process to go once all are there, when
jax.distributed then takes the port and connects in seconds. Each process also keeps a listening
port of its own for the run (`Presence`), which the others probe to tell which process was lost.
Standard library only: importing it needs no JAX.
"""

import dataclasses
import json
import select
import socket
import time

from keras_mixer.training.peers import ClusterError, describe, is_this_machine, listen, split_address, wait_for

ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
COUNT = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
HELLO = "keras_mixer join"  # a joining process's first line: "keras_mixer join ID COUNT"
ADVICE = f"Start every process (the same command, each with its own {PROCESS_ID}), check {ADDRESSES} and the firewalls"


@dataclasses.dataclass(frozen=True)
class Hosts:
    """The processes of a run over several hosts, as the environment gives them."""

    coordinator: str  # "host:port" of process 0, where jax.distributed's coordination service listens
    count: int
    process_id: int
    addresses: tuple = ()  # every process's "host:port", where the environment lists them all

    def address(self, index):
        """Process `index`'s "host:port" where known, else ""."""
        return self.addresses[index] if self.addresses else self.coordinator if index == 0 else ""

    def peers(self, indices):
        """[(name, address)] of the processes `indices`, as `peers.describe` names them."""
        return [(f"process {i}", self.address(i)) for i in indices]

    def others(self):
        return [i for i in range(self.count) if i != self.process_id]


def read_environment(environ):
    """The `Hosts` of Keras' KERAS_DISTRIBUTION_* variables in `environ`; None when they are not set
    (one host). ClusterError (one line) for a value that cannot start a run."""
    text = {key: environ.get(key, "").strip() for key in (ADDRESSES, COUNT, PROCESS_ID)}
    if not any(text.values()):
        return None
    if not text[COUNT]:
        given = ", ".join(key for key in text if text[key])
        raise ClusterError(f"{given} set but not {COUNT}: set it to the number of processes of the run (e.g. 2)")
    count = _whole_number(COUNT, text[COUNT], "the number of processes of the run, 1 or more (e.g. 2)")
    if count < 1:
        raise ClusterError(f"{COUNT}={count} is not a number of processes: expected 1 or more (e.g. 2)")
    if not text[PROCESS_ID]:
        if count == 1:
            return None
        raise ClusterError(f"{PROCESS_ID} is not set: each of the {count} processes needs its own, 0 to {count - 1}")
    process_id = _whole_number(PROCESS_ID, text[PROCESS_ID], f"this process's number, 0 to {count - 1}")
    if not 0 <= process_id < count:
        raise ClusterError(
            f"{PROCESS_ID}={process_id} is out of range: the run has {count} process(es) ({COUNT}), so 0 to {count - 1}"
        )
    if count == 1:
        return None
    if not text[ADDRESSES]:
        raise ClusterError(
            f"{ADDRESSES} is not set: give the coordinator's (process 0's) \"host:port\", the same on every process"
        )
    addresses = tuple(address.strip() for address in text[ADDRESSES].split(","))
    for address in addresses:
        if split_address(address) is None:
            raise ClusterError(f'{ADDRESSES}={text[ADDRESSES]!r}: {address!r} is not "host:port" (e.g. 10.0.0.1:1234)')
    if len(addresses) > 1 and len(addresses) != count:
        raise ClusterError(
            f"{ADDRESSES} lists {len(addresses)} addresses but {COUNT} is {count}: give the coordinator's alone, or "
            f"every process's in process-id order"
        )
    return Hosts(addresses[0], count, process_id, addresses if len(addresses) > 1 else ())


def _whole_number(key, text, expected):
    try:
        return int(text)
    except ValueError:
        raise ClusterError(f"{key}={text!r} is not a whole number: expected {expected}") from None


def check_coordinator(hosts):
    """ClusterError when the coordinator's host does not resolve, or, on process 0, is not this
    machine (process 0 runs the coordination service there)."""
    host, _ = split_address(hosts.coordinator)
    try:
        here = is_this_machine(host)
    except socket.gaierror as e:
        raise ClusterError(f"{ADDRESSES} names the coordinator at {hosts.coordinator}: {host!r} does not resolve ({e})")
    if hosts.process_id == 0 and not here:
        raise ClusterError(
            f"this is process 0 ({PROCESS_ID}), the coordinator, but {ADDRESSES} puts it at {hosts.coordinator}, "
            f"which is not this machine ({socket.gethostname()}): start process 0 there, or give this process "
            f"another {PROCESS_ID}"
        )


class Presence:
    """A listening port kept open while the process runs: the kernel answers a probe of it as long
    as the process lives, and refuses it once the process is gone (`peers.unreachable`). Its
    `address` ("host:port") is what the other hosts reach it by: this machine's address on the
    route to `towards` (the coordinator's host), else on its default route."""

    def __init__(self, towards=None):
        self.socket = socket.socket()
        self.socket.bind(("", 0))
        self.socket.listen(64)
        self.address = f"{_route_address(towards or '192.0.2.1')}:{self.socket.getsockname()[1]}"


def _route_address(destination):
    """This machine's address on the route to `destination` (a UDP socket's connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as route:
        try:
            route.connect((destination, 9))
            return route.getsockname()[0]
        except OSError:  # no route: the address the machine's name resolves to
            try:
                return socket.gethostbyname(socket.gethostname())
            except OSError:
                return "127.0.0.1"


def join(hosts, timeout, report_every=None, poll=0.5):
    """Meets every process of `hosts` before jax.distributed starts. Waits at most `timeout`
    seconds (ClusterError naming the missing processes, on every process that joined); SIGTERM /
    Ctrl-C end the wait at once (ClusterError with `signum`). Nothing is written."""
    print(
        f"Joining a {hosts.count}-process run as process {hosts.process_id} (coordinator "
        f"{hosts.coordinator}); waiting for {describe(hosts.peers(hosts.others()))}",
        flush=True,
    )
    meeting = _Coordinator(hosts, poll) if hosts.process_id == 0 else _Joiner(hosts, poll)
    kwargs = {} if report_every is None else {"report_every": report_every}
    try:
        wait_for(meeting.missing, timeout, ADVICE, poll=poll, absent_means="not joined", **kwargs)
        meeting.go()
    except BaseException as e:
        meeting.stop(str(e))
        raise
    finally:
        meeting.close()


class _Lines:
    """A connection read and written as lines of text."""

    def __init__(self, connection):
        self.connection, self.buffer, self.closed = connection, b"", False
        connection.setblocking(False)

    def read(self):
        """The complete lines that arrived; `closed` once the other end closed."""
        while not self.closed:
            try:
                data = self.connection.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.closed = True
            self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode(errors="replace") for line in lines]

    def send(self, text):
        try:
            self.connection.setblocking(True)
            self.connection.sendall(text.encode() + b"\n")
            self.connection.setblocking(False)
        except OSError:
            self.closed = True

    def close(self):
        self.connection.close()


class _Coordinator:
    """Process 0's side of `join`: the coordinator's port, the processes that said who they are."""

    def __init__(self, hosts, poll):
        self.hosts, self.poll = hosts, poll
        self.listener = listen(split_address(hosts.coordinator)[1], f"the coordinator ({hosts.coordinator})")
        self.new, self.joined, self.told = [], {}, None  # joined: {id: (_Lines, the host it joined from)}

    def missing(self):
        self._accept()
        for lines in self.new[:]:
            first = lines.read()[:1]
            if first or lines.closed:
                self.new.remove(lines)
                self._hello(lines, first[0] if first else "")
        for index, (lines, _) in list(self.joined.items()):
            lines.read()
            if lines.closed:  # it ended (or restarted) before the run formed
                del self.joined[index]
                lines.close()
        absent = [i for i in self.hosts.others() if i not in self.joined]
        if absent != self.told:  # every process waiting is told whom the run still waits for
            self.told = absent
            for lines, _ in self.joined.values():
                lines.send(f"missing {json.dumps(absent)}")
        if absent:
            select.select([self.listener] + [c.connection for c in self.new], [], [], self.poll)
        return self.hosts.peers(absent)

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.new.append(_Lines(connection))

    def _hello(self, lines, line):
        """Takes a new connection's first line: a process that joins, or a connection closed."""
        words = line.split()
        if line.startswith(HELLO) and len(words) == 4 and all(w.isdigit() for w in words[2:]):
            index, count = map(int, words[2:])
            host = lines.connection.getpeername()[0]
            if count != self.hosts.count:
                lines.send(f"refused it says the run has {count} processes, the coordinator says {self.hosts.count}")
            elif not 0 < index < count:
                lines.send(f"refused process {index} is not a process the coordinator waits for (1 to {count - 1})")
            elif index in self.joined:
                lines.send(f"refused process {index} joined already, from {self.joined[index][1]}")
            else:
                self.joined[index] = (lines, host)
                return
        lines.close()  # not one of ours (a probe, a stray client), or refused

    def go(self):
        """Tells every process the run formed."""
        for lines, _ in self.joined.values():
            lines.send("go")
        # Each process closes its end first, so the port is free of our connections when
        # jax.distributed's coordination service takes it.
        deadline = time.monotonic() + 10
        for lines, _ in self.joined.values():
            while not lines.closed and time.monotonic() < deadline:
                select.select([lines.connection], [], [], 0.1)
                lines.read()

    def stop(self, why):
        for lines, _ in self.joined.values():
            lines.send(f"stop {why}")

    def close(self):
        for lines in self.new + [lines for lines, _ in self.joined.values()]:
            lines.close()
        self.listener.close()


class _Joiner:
    """The side of `join` of every process but 0: connects to the coordinator until it answers."""

    def __init__(self, hosts, poll):
        self.hosts, self.poll = hosts, poll
        self.lines, self.absent = None, [0]

    def missing(self):
        if self.lines is None:
            try:
                connection = socket.create_connection(split_address(self.hosts.coordinator), timeout=self.poll)
            except OSError:
                return self.hosts.peers([0])
            self.lines = _Lines(connection)
            self.lines.send(f"{HELLO} {self.hosts.process_id} {self.hosts.count}")
            self.absent = [i for i in range(1, self.hosts.count) if i != self.hosts.process_id]
        select.select([self.lines.connection], [], [], self.poll)
        for line in self.lines.read():
            word, _, rest = line.partition(" ")
            if word == "missing":
                self.absent = json.loads(rest)
            elif word == "go":
                return []
            elif word in ("refused", "stop"):
                what = "refused this process" if word == "refused" else "gave up"
                raise ClusterError(f"the coordinator (process 0, {self.hosts.coordinator}) {what}: {rest}")
        if self.lines.closed:  # the coordinator ended or restarted: connect again
            self.lines.close()
            self.lines, self.absent = None, [0]
        # Until the coordinator says go, the run waits at least for it.
        return self.hosts.peers(self.absent or [0])

    def go(self):
        self.lines.close()

    def stop(self, why):
        pass  # the coordinator decides for everyone; it sees this process leave

    def close(self):
        if self.lines is not None:
            self.lines.close()
