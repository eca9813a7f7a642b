"""Test helper: runs the command-line programs in subprocesses, as a user runs them."""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The programs the suite starts compile the same few XLA programs again and again (a training step,
# an evaluation step, ~160 variable initializers on JAX); both compilers' on-disk caches let every
# run after the first load them instead, which halves a short run (39 -> 19 s on JAX, 32 -> 21 s on
# TF for a one-step demo run, 2-core Xeon). A cached program is the compiled program, so results
# are unchanged; the caches are shared by the suite's processes and keyed by the program and flags.
_CACHE = os.path.join(tempfile.gettempdir(), f"keras_mixer_test_xla_cache_{os.getuid()}")
ENV = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "PYTHONPATH": ROOT,
    "JAX_COMPILATION_CACHE_DIR": os.path.join(_CACHE, "jax"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "TF_XLA_FLAGS": f"--tf_xla_persistent_cache_directory={os.path.join(_CACHE, 'tf')}",
}

# A short demo run with checkpoints at 20, 40 and 60: the run the fault tests break on either backend.
RUN = ["--steps", 60, "--checkpoint_every", 20, "--log_every", 20]
JAX = {"KERAS_BACKEND": "jax"}


def trainer(program, *args, check=True, timeout=600, env=None, cwd=ROOT):
    """Runs trainers/<program>.py with `args`; raises with its output when `check` and it fails."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "trainers", f"{program}.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        cwd=cwd,
        timeout=timeout,
        preexec_fn=lambda: os.umask(0o022),
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{program} {args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def error_lines(result):
    """The `error: ...` lines a program printed to stderr."""
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def assert_one_line_error(result, *fragments):
    """A non-zero exit with exactly one `error:` line holding every fragment, and no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
