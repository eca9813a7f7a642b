"""Writing files so that nothing finished is ever half-written, and everything is readable.

`atomic_write` writes through a temporary file in the target's folder and renames it into place:
a reader (or a rerun after a kill) sees the old file or the complete new one, never a mix.
Temporary files are created private (0600) by `tempfile`; they are given the mode a plain
`open()` would have given (0666 minus the umask) before the rename, so a TF Serving process or a
colleague running as another user can read exports, metrics and weights.
"""

import json
import math
import os
import tempfile

TMP_PREFIX = ".tmp-"


def current_umask():
    """The process umask, read without changing it where /proc allows (no race with threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable_file_mode():
    return 0o666 & ~current_umask()


def readable_dir_mode():
    return 0o777 & ~current_umask()


def make_tree_readable(folder):
    """Gives `folder` and everything under it the modes plain `open`/`mkdir` would have given."""
    file_mode, dir_mode = readable_file_mode(), readable_dir_mode()
    os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


def atomic_write(path, write):
    """Calls `write(binary file)` on a temporary file beside `path`, then renames it to `path`.

    An existing file is replaced only by a complete new one. On any error (a full disk included)
    the temporary file is removed and the error raised; `path` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"Cannot write {path!r}: it is a directory")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.basename(path))
    try:
        os.fchmod(fd, readable_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def strict_json(value):
    """`value` with every NaN or infinity replaced by None (JSON `null`), recursively: JSON has
    no NaN, and a file with one is rejected by strict readers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path, payload):
    """Writes `payload` as strict JSON (NaN and infinities become null), atomically."""
    text = json.dumps(strict_json(payload), indent=2, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path):
    """The JSON object in `path`, or None when the file is missing, empty or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
