"""What a training run tells while it runs: the progress bar, TensorBoard scalars, the loss history
and `metrics.json` (rewritten at every checkpoint, so a resumed run continues its history)."""

import logging
import os
import sys
import time

import keras

from keras_mixer.atomic_files import write_json

log = logging.getLogger("keras_mixer")


class Throughput:
    """Images per second of steady-state training: wall clock inside the training calls, so waiting
    for input counts. The first call on each input stream (tracing, compilation, filling the
    prefetch buffers) is left out; checkpointing, logging and evaluation between calls are not
    training and are not counted."""

    def __init__(self, global_batch):
        self.global_batch = global_batch
        self.images, self.seconds = 0, 0.0
        self._warm = False

    def restart(self):
        self._warm = False

    def start(self):
        self._started = time.perf_counter()

    def stop(self, steps):
        """After a call of `steps` steps; returns the rate so far (None before any counted call)."""
        if self._warm:
            self.images += steps * self.global_batch
            self.seconds += time.perf_counter() - self._started
        self._warm = True
        return self.rate()

    def rate(self):
        return self.images / self.seconds if self.seconds > 0 else None


class ProgressLines:
    """Progress for a log file: a line every `log_every` steps, and one at least every `seconds`
    between them, e.g. "step 120/880  loss 0.4123  img/s 1315  ETA 1m 12s". The ETA is
    the wall clock per step since this process started, so checkpoints and evaluations count."""

    def __init__(self, total_steps, log_every, seconds=30.0):
        self.total_steps, self.log_every, self.seconds = total_steps, log_every, seconds
        self._first = None  # (step, time) of the first update
        self._said = time.monotonic()

    def update(self, step, values=()):
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
            return
        if not (step % self.log_every == 0 or step >= self.total_steps or now - self._said >= self.seconds):
            return
        self._said = now
        parts = [f"step {step}/{self.total_steps}"]
        for name, value in values:
            parts.append(f"{name} {value:.4f}" if name == "loss" else f"{name} {value:.0f}")
        done, started = step - self._first[0], now - self._first[1]
        if 0 < done and step < self.total_steps:
            parts.append(f"ETA {_duration(started / done * (self.total_steps - step))}")
        print("  ".join(parts), flush=True)


def _duration(seconds):
    """3h 05m, 1m 12s or 9s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


class Report:
    """The run's outputs for people: `metrics` (the dict written to metrics.json) plus the
    progress bar and TensorBoard. Only the chief writes; other workers keep the numbers."""

    def __init__(self, workdir, chief, total_steps, metrics, log_every=1):
        self.path = os.path.join(workdir, "metrics.json")
        self.chief = chief
        self.metrics = metrics
        self.writer = _summary_writer(os.path.join(workdir, "tensorboard")) if chief else None
        if not chief:
            self.progress = keras.utils.Progbar(total_steps, verbose=0)
        elif sys.stdout.isatty():
            self.progress = keras.utils.Progbar(total_steps, stateful_metrics=["loss", "img/s"])
        else:  # a log file or a pipe: whole lines, not a bar redrawn with carriage returns
            self.progress = ProgressLines(total_steps, log_every)
        self.progress.update(metrics["step"])

    def trained(self, step, loss, top1, norm, learning_rate, rate, log_point):
        """After a host call of training steps; `log_point`: add to the history and TensorBoard
        (`learning_rate` is read only for those)."""
        self.metrics.update(step=step, train_loss=loss, train_top1=top1)
        self.progress.update(step, [("loss", loss)] + ([("img/s", rate)] if rate else []))
        if not log_point:
            return
        self.metrics["loss_history"].append([step, loss])
        self._scalars(
            step,
            {
                "train/loss": loss,
                "train/top1": top1,
                "train/learning_rate": learning_rate,
                "train/gradient_norm": norm,
                "train/images_per_second": rate,
            },
        )

    def evaluated(self, step, top1, top5):
        log.info("step %d: eval top-1 %.4f, top-5 %.4f", step, top1, top5)
        self.metrics.update(eval_top1=top1, eval_top5=top5)
        self._scalars(step, {"eval/top1": top1, "eval/top5": top5})

    def fewshot(self, step, results):
        """After a few-shot probe: `results` {k: dict(mean, ...)} (keras_mixer.training.fewshot)."""
        means = {f"{k}shot": r["mean"] for k, r in results.items()}
        log.info("step %d: few-shot top-1 %s", step, ", ".join(f"{name} {v:.4f}" for name, v in means.items()))
        self.metrics["fewshot"] = dict(step=step, **means)
        self._scalars(step, {f"fewshot/{name}": v for name, v in means.items()})

    def save(self, **updates):
        """Writes metrics.json (progress, or with finished=True the final record)."""
        self.metrics.update(updates)
        if self.chief:
            write_json(self.path, self.metrics)

    def _scalars(self, step, values):
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, float(value), step=step)
        self.writer.flush()  # a point is on disk as soon as it is reported: TensorBoard shows it live


def _summary_writer(folder):
    """TensorBoard's own event writer (no TensorFlow needed, so the same on either backend), or
    None with a note where TensorBoard is not installed."""
    try:
        from tensorboard.summary import Writer
    except ImportError:
        log.warning("TensorBoard is not installed: no tensorboard/ curves (pip install tensorboard)")
        return None
    return Writer(folder)
