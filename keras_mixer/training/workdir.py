"""The training workdir: one owner at a time, no litter from killed runs, nothing deleted.

WORKDIR/lock              who owns the workdir (pid, host, start time, command); empty when free
WORKDIR/run.json          the recipe the run was started with, and any accepted changes
WORKDIR/metrics.json      progress (rewritten at every checkpoint), then the final results
WORKDIR/checkpoints/      training state, see `checkpoint_store`
WORKDIR/model.keras, WORKDIR/export/<step>/, WORKDIR/tensorboard/
WORKDIR/previous/<time>/  what `--restart` moved out of the way
"""

import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time

from keras_mixer.atomic_files import TMP_PREFIX, readable_file_mode

log = logging.getLogger("keras_mixer")

# A lock whose holder runs on another host counts as stale once its heartbeat is this old.
STALE_AFTER_SECONDS = 120
HEARTBEAT_SECONDS = 30


class WorkdirError(ValueError):
    """The workdir cannot be used as asked (in use, unreadable, a file...): the message says why
    and what to do."""


def check_workdir(workdir):
    """Creates `workdir` if needed; WorkdirError when it is a file or cannot be written."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir!r} is a file, not a folder: give a folder path")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create --workdir {workdir!r}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir {workdir!r} is not writable by this user")


def _utc(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _pid_alive(pid):
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class WorkdirLock:
    """`WORKDIR/lock`, held for the whole run.

    An exclusive `flock` on the file does the locking: the kernel releases it when the holder dies,
    even by `kill -9`. The file's content names the holder for the message a second trainer
    prints. A record left by a holder that is gone (same host: its pid no longer runs; another
    host sharing the file system: no heartbeat for STALE_AFTER_SECONDS) is taken over with a
    warning. The holder touches the file every HEARTBEAT_SECONDS.
    """

    def __init__(self, workdir):
        self.workdir = workdir
        self.path = os.path.join(workdir, "lock")
        self._fd = None
        self._stop = threading.Event()

    def _busy(self, holder):
        return WorkdirError(
            f"workdir {os.path.abspath(self.workdir)!r} is in use by pid {holder.get('pid')} on host "
            f"{holder.get('host')!r} since {holder.get('started')} ({holder.get('command')}). Wait for that run "
            f"to end or stop it, or give another --workdir. If it is surely dead, delete {self.path!r}."
        )

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, readable_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            kernel_lock = True
        except BlockingIOError:
            holder = self._read(fd) or {}
            os.close(fd)
            raise self._busy(holder) from None
        except OSError as e:  # a file system without flock: fall back on the record alone
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            kernel_lock = False
        holder = self._read(fd)
        if holder:
            same_host = holder.get("host") == socket.gethostname()
            if same_host and not kernel_lock and _pid_alive(holder.get("pid")):
                os.close(fd)
                raise self._busy(holder)
            age = time.time() - os.fstat(fd).st_mtime
            if not same_host and age < STALE_AFTER_SECONDS:
                os.close(fd)
                raise self._busy(holder)
            print(
                f"warning: took over a stale workdir lock (pid {holder.get('pid')} on {holder.get('host')}, "
                f"started {holder.get('started')}, is gone)",
                file=sys.stderr,
                flush=True,
            )
        record = dict(pid=os.getpid(), host=socket.gethostname(), started=_utc(time.time()), command=" ".join(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True).start()
        return self

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass

    @staticmethod
    def _read(fd):
        """The holder record in the lock file; None when empty (free) or unreadable (no one can
        have written it while we could take the flock)."""
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "null")
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def release(self):
        if self._fd is None:
            return
        self._stop.set()
        try:
            os.ftruncate(self._fd, 0)  # empty: free (the file stays, so no one locks a deleted inode)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def remove_leftovers(workdir):
    """Removes what a killed run leaves behind: TensorFlow's `ckpt-N_temp/` staging folders,
    `.tmp-*` files of interrupted atomic writes and `export/.tmp-export-*` staging folders.
    Only called while holding the lock, so no live writer owns them. Returns what was removed."""
    patterns = [
        os.path.join(workdir, "checkpoints", "*_temp"),
        os.path.join(workdir, "checkpoints", "*_temp_*"),
        os.path.join(workdir, TMP_PREFIX + "*"),
        os.path.join(workdir, "checkpoints", TMP_PREFIX + "*"),
        os.path.join(workdir, "export", TMP_PREFIX + "*"),
    ]
    removed = sorted({path for pattern in patterns for path in glob.glob(pattern)})
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    if removed:
        log.info("Removed %d leftover(s) of an interrupted run: %s", len(removed), ", ".join(removed[:5]))
    return removed


# What `--restart` moves out of the way; the lock and earlier `previous/` stay.
RUN_FILES = ("checkpoints", "run.json", "metrics.json", "model.keras", "export", "tensorboard")


def move_to_previous(workdir):
    """Moves the run's files into WORKDIR/previous/<UTC time>/ (nothing is deleted); returns the
    folder, or None when there was nothing to move."""
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(workdir, name))]
    if not present:
        return None
    target = os.path.join(workdir, "previous", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    suffix, base = 1, target
    while os.path.exists(target):
        target, suffix = f"{base}-{suffix}", suffix + 1
    os.makedirs(target)
    for name in present:
        os.rename(os.path.join(workdir, name), os.path.join(target, name))
    return target
