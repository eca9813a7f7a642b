"""A training run's setup and bookkeeping, the same on either Keras backend.

Both loops (`loop`: TensorFlow's tf.distribute; `jax_loop`: Keras' JAX backend) run

    lock the workdir (one owner), catch SIGTERM/SIGINT (`StopSignals`)
    -> prepare: leftovers out, recipe checked against run.json, data sources, run length (`Run`)
    -> build the model (`build_model`), restore the newest intact checkpoint, write run.json
    -> host calls of steps up to the next boundary, each followed by the report, a checkpoint, an
       evaluation and a few-shot probe when due (`train_steps`, `make_report`)
    -> finish: model.keras, the TF Serving export, metrics.json (`finish`)

and differ only in how a step runs and how its state is saved: the `Engine` each loop gives
`train_steps`.
"""

import dataclasses
import logging
import math
import os
import signal
import threading
from typing import Optional, Protocol

import keras

from keras_mixer import data
from keras_mixer.atomic_files import read_json, write_json
from keras_mixer.model.mixer import MlpMixer
from keras_mixer.model.trained_on import TrainedOn
from keras_mixer.training.config import TrainConfig, check_resumed_recipe, run_length
from keras_mixer.training.fewshot import TRAINING_DRAWS, FewshotProbe
from keras_mixer.training.optimizer import set_mixed_precision
from keras_mixer.training.reporting import Report, Throughput
from keras_mixer.training.sizing import fit_to_data, keep_decided, scale_to_length
from keras_mixer.training.stops import TrainingDiverged, TrainingStopped
from keras_mixer.training.tf.checkpoints import checkpoint_backend
from keras_mixer.training.workdir import move_to_previous, remove_leftovers
from keras_mixer.weights_io import loader
from keras_mixer.weights_io.official_keys import save_keras

log = logging.getLogger("keras_mixer")
# A band of evaluation crop ratios wider than this giving one crop is worth a warning.
COARSE_CROPS = 0.05


class StopSignals:
    """While active, SIGTERM (what schedulers and preemptible VMs send before killing) and SIGINT
    (Ctrl-C) only set `received`; the loop then checkpoints the step it is at and stops. A second
    signal acts as usual (kills). Only in the main thread, and not in multi-worker runs, where
    saving needs every worker at once."""

    def __init__(self, enabled=True):
        self.received = None
        self._previous = {}
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if self._enabled:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def build_model(config, num_classes):
    """The Mixer to train, outputting logits: fresh (pre-training) or from `config.init` (any
    weights source; its head is kept when the class counts match, else set to zeros) and, for a
    larger `image_size`, the block-diagonal resolution expansion (fine-tuning). Without
    `config.model` the architecture is the init weights'."""
    size = config.image_size
    common = dict(
        input_shape=(size, size, 3),
        classes=num_classes,
        classifier_activation=None,
        dropout_rate=config.dropout,
        drop_path_rate=config.drop_path,
        seed=config.seed,
    )
    if config.mode == "pretrain":
        return loader.create(MlpMixer, config.model, **common)
    if config.model is None:
        return MlpMixer.from_preset(config.init, name="mixer_finetuned", **common)
    return loader.create(MlpMixer, config.model, config.init, **common)


def trained_on(config, class_names):
    """The `TrainedOn` record of a model trained by `config`: written into run.json and carried by
    model.keras and the export, so they are evaluated and served as the run evaluated."""
    return TrainedOn(config.dataset, class_names, config.eval_preprocessing, config.model, config.image_size)


@dataclasses.dataclass
class Run:
    """What `prepare` works out before anything is built."""

    config: TrainConfig
    kind: str  # how steps are spread: a tf.distribute strategy kind, or "jax data-parallel"
    chief: bool
    replicas: int  # devices taking part in a step, all hosts together
    record: Optional[dict]  # run.json as found (None for a new workdir)
    changes: list  # accepted recipe changes [(field, recorded, new)]
    train_source: object
    eval_source: object
    eval_split: str
    total_steps: int
    steps_per_epoch: int
    fewshot: Optional[FewshotProbe]  # with config.fewshot_every: the shots drawn, their labels read

    @property
    def workdir(self):
        return self.config.workdir


def prepare(config, kind, chief, replicas, restart, accept_changes):
    """Workdir housekeeping, the recipe check, the data sources and the run's length: a `Run`.

    Args:
        kind: recorded in metrics.json; chief: whether this process writes the workdir;
        replicas: the devices of a step, which the batch must divide into.
    """
    workdir = config.workdir
    if chief:
        remove_leftovers(workdir)
        if restart:
            moved = move_to_previous(workdir)
            if moved:
                print(f"--restart: the earlier run's files were moved to {moved}", flush=True)
    record = read_json(os.path.join(workdir, "run.json"))
    changes = []
    written_by = checkpoint_backend(os.path.join(workdir, "checkpoints"))
    if written_by is not None:
        backend = keras.backend.backend()
        if written_by != backend:
            raise ValueError(
                f"{workdir}'s checkpoints were written on Keras' {written_by} backend and this process runs "
                f"{backend}: resume with KERAS_BACKEND={written_by}. To go on from its weights on {backend}, "
                f"fine-tune with --init {os.path.join(workdir, 'model.keras')} (once it finished) into a new workdir"
            )
    train_source = data.load_source(config.dataset, "train", data_dir=config.data_dir, download=config.download)
    eval_split = data.eval_split(config.dataset, config.data_dir)
    eval_source = data.load_source(
        config.dataset, eval_split, data_dir=config.data_dir, class_names=train_source.class_names
    )
    # Sized before the recipe check, so a resumed run compares (and run.json records) the values
    # used; a resumed run was sized and scaled at its start and keeps that.
    resumed = written_by is not None and record is not None and "config" in record
    if resumed:
        config = keep_decided(config, record["config"])
    config, sized = fit_to_data(config, train_source)
    total_steps, steps_per_epoch = run_length(config, train_source.num_examples)
    config, scaled = (config, None) if resumed else scale_to_length(config, total_steps, steps_per_epoch)
    config.validate()
    if written_by is not None:
        changes = check_resumed_recipe(record and record.get("config"), config, accept_changes)
    set_mixed_precision(config.mixed_precision)
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    if chief:
        for line in (sized, scaled):
            if line:
                print(line, flush=True)
        for source in (train_source, eval_source):
            if source.problems():
                print(f"warning: {source.describe_problems()}", flush=True)
        # Said for a ratio the command line gives, which may be meant to differ from a near one.
        taken, (low, high) = config.eval_preprocessing.crop_range(config.image_size)
        if "crop_ratio" in config.flags_given and config.eval_resize == "crop" and high - low > COARSE_CROPS:
            print(
                f"warning: at {config.image_size} px, crop_ratio {config.crop_ratio} takes a centre crop of ratio "
                f"{taken:.3f}, as does every ratio from {low:.3f} to {high:.3f}: the resized side is whole pixels",
                flush=True,
            )
        if config.crop_area_min >= 1 and config.eval_resize == "crop":
            print(
                f"warning: training sees whole images (crop_area_min 1) but evaluation centre-crops them "
                f"(eval_resize crop, crop_ratio {config.crop_ratio}), showing objects larger than training did; "
                f"--eval_resize resize matches training",
                flush=True,
            )
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {replicas} replicas")
    fewshot = None
    if config.fewshot_every:
        # Drawn now, so shots the data cannot give fail before anything is built.
        fewshot = FewshotProbe(
            train_source,
            eval_source,
            config.fewshot_shots,
            config.image_size,
            config.eval_preprocessing,
            config.batch_size,
            draws=TRAINING_DRAWS,
            seed=config.seed or 0,
        )
    return Run(
        config,
        kind,
        chief,
        replicas,
        record,
        changes,
        train_source,
        eval_source,
        eval_split,
        total_steps,
        steps_per_epoch,
        fewshot,
    )


def write_record(run, model, resumed_from):
    """run.json: the recipe, the architecture and what the model is trained on (what evaluate.py
    and export.py need to rebuild and use it), and every accepted recipe change."""
    config, record = run.config, run.record
    if resumed_from is None or record is None:
        record = dict(
            config=dataclasses.asdict(config),
            architecture=model.get_config(),
            about=trained_on(config, run.train_source.class_names).to_dict(),
            num_classes=run.train_source.num_classes,
            eval_split=run.eval_split,
            total_steps=run.total_steps,
            recipe_changes=[],
        )
    if run.changes:
        record["recipe_changes"] = record.get("recipe_changes", []) + [
            dict(step=resumed_from, field=name, recorded=old, now=new) for name, old, new in run.changes
        ]
        record.update(config=dataclasses.asdict(config), total_steps=run.total_steps)
        record["about"] = trained_on(config, run.train_source.class_names).to_dict()
        print(
            f"Accepted recipe changes at step {resumed_from}: "
            + ", ".join(f"{n} {o!r} -> {v!r}" for n, o, v in run.changes)
        )
    write_json(os.path.join(run.workdir, "run.json"), record)
    return record


def make_report(run, step, resumed_from, previous, use_xla):
    """The run's `Report`, its metrics.json starting from `previous` (a resumed run's) at `step`."""
    config = run.config
    data_problems = {s.split: s.problems() for s in (run.train_source, run.eval_source) if s.problems()}
    metrics = dict(
        finished=False,
        step=step,
        total_steps=run.total_steps,
        train_loss=previous.get("train_loss"),
        train_top1=previous.get("train_top1"),
        eval_top1=None,
        eval_top5=None,
        eval_split=run.eval_split,
        images_per_second=None,
        # The loss history of the steps before the restored checkpoint survives in metrics.json.
        loss_history=[h for h in previous.get("loss_history", []) if h[0] <= step],
        resumed_from_step=resumed_from or 0,
        model=config.model,
        dataset=config.dataset,
        strategy=run.kind,
        replicas=run.replicas,
        xla=use_xla,
        data_problems=data_problems,
        fewshot=None,
    )
    return Report(run.workdir, run.chief, run.total_steps, metrics, config.log_every)


def previous_metrics(run, resumed_from):
    """metrics.json as the resumed run left it ({} for a fresh start)."""
    if resumed_from is None:
        return {}
    log.info("Resumed from step %d of %d", resumed_from, run.total_steps)
    return read_json(os.path.join(run.workdir, "metrics.json")) or {}


def already_finished(run, resumed_from, previous):
    """True (and said, by the chief) when the restored checkpoint is the end of a finished run:
    finished is finished, nothing is trained or rewritten."""
    if resumed_from is None or resumed_from < run.total_steps or not previous.get("finished"):
        return False
    if run.chief:
        top1 = previous.get("eval_top1")
        print(
            f"The run in {os.path.abspath(run.workdir)} already finished at step {previous.get('step')} "
            f"(eval top-1 {top1:.4f}): nothing to do, nothing rewritten. Give a larger --steps "
            f"with --accept_changes=steps to train further, or --restart to start again.",
            flush=True,
        )
    return True


def recipe_pipeline_args(config):
    """The recipe's `data.train_pipeline` arguments: its global batch size, image size, shuffle
    buffer, augmentation and one-hot labels."""
    return dict(
        batch_size=config.batch_size,
        image_size=config.image_size,
        shuffle_buffer=config.shuffle_buffer,
        randaugment=config.randaugment,
        mixup=config.mixup,
        one_hot=True,
        area_range=(config.crop_area_min, 1.0),
        flip=config.flip,
    )


def epoch_seed(run_seed, epoch):
    """The seed of epoch `epoch`'s stream: each epoch is a pure function of (run seed, epoch), so a
    resumed run rebuilds the stream it was in."""
    return run_seed * 100_003 + epoch


def diverged(what, store):
    last = store.latest()
    raise TrainingDiverged(
        f"{what}: training stopped. The last good checkpoint ({last or 'none yet'}) is kept; lower the "
        f"learning rate or check the data, then rerun with the same --workdir to resume from it."
    )


def next_boundary(step, config, epoch_end):
    """The next step at which the loop must stop to log, checkpoint, evaluate, probe or change epoch."""
    candidates = [epoch_end, (step // config.checkpoint_every + 1) * config.checkpoint_every]
    candidates.append((step // config.log_every + 1) * config.log_every)
    for every in (config.eval_every, config.fewshot_every):
        if every:
            candidates.append((step // every + 1) * every)
    return min(candidates)


class Engine(Protocol):
    """How one backend's loop runs steps and keeps its state, for `train_steps`."""

    store: object  # the checkpoint store: save(step, ...) through `save`, latest() for messages
    # True where steps queue on the devices without the host waiting (JAX's asynchronous dispatch):
    # a host call then runs to the next boundary whatever steps_per_loop says, as reading the loss
    # is the only wait, and the devices never idle while the host does its bookkeeping.
    queues_steps: bool

    def open_epoch(self, epoch, skip_steps):
        """Starts epoch `epoch`'s input stream (`epoch_seed`), its first `skip_steps` steps skipped."""

    def train(self, count, stopped):
        """Runs `count` steps on the open stream, fewer where it can stop early once `stopped()` is
        true (a signal arrived); (steps run, then their mean loss, gradient norm and top-1 as floats)."""

    def learning_rate(self, step):
        """The schedule's rate after `step` steps."""

    def weights_finite(self):
        """False when a trainable weight is NaN or Inf."""

    def save(self, step):
        """Checkpoints the state after `step` steps."""

    def evaluate(self):
        """(top-1, top-5) of the current weights on the evaluation split."""

    def probe(self):
        """The few-shot probe's results for the current weights (`FewshotProbe`)."""

    def between_calls(self, step):
        """After each host call's checkpoint, evaluation and probe, at `step`: where the cluster
        agreed to stop (a multi-worker run's preemption), saves and raises TrainingStopped."""

    def close(self):
        """After the last step: the final state into the Keras model (and optimizer), to save it."""


def train_steps(run, engine, report, signals, step):
    """The host calls from `step` to the run's end, then the final evaluation (and probe); returns
    the step reached. A call runs up to the next boundary (`next_boundary`, at most
    `steps_per_loop` steps unless the engine queues steps); after it: the report, a checkpoint
    when due or signalled (then TrainingStopped), an evaluation and a probe when due. A NaN or
    Inf loss, or weights that are not finite when a checkpoint is due, stop the run with the last
    good checkpoint kept."""
    config = run.config
    speed = Throughput(config.batch_size)
    while step < run.total_steps:
        epoch, offset = divmod(step, run.steps_per_epoch)
        engine.open_epoch(epoch, offset)
        epoch_end = min((epoch + 1) * run.steps_per_epoch, run.total_steps)
        speed.restart()  # a new input stream fills its buffers first
        warm = False
        while step < epoch_end:
            # Where steps queue, the stream's first call is one step (compilation, the input's
            # buffers: `Throughput` leaves it out), the others run to the next boundary.
            limit = (run.total_steps if warm else 1) if engine.queues_steps else config.steps_per_loop
            count = min(limit, next_boundary(step, config, epoch_end) - step)
            warm = True
            speed.start()
            count, loss, norm, top1 = engine.train(count, lambda: signals.received)
            rate = speed.stop(count)
            if not math.isfinite(loss):
                diverged(f"loss is {loss} at step {step + count}", engine.store)
            step += count
            log_point = step % config.log_every == 0 or step == run.total_steps
            learning_rate = engine.learning_rate(step) if log_point else None
            report.trained(step, loss, top1, norm, learning_rate, rate, log_point)
            if step % config.checkpoint_every == 0 or step == run.total_steps or signals.received:
                # A finite loss can still come with an update that overflowed: never save such weights.
                if not engine.weights_finite():
                    diverged(f"weights became NaN or Inf at step {step}", engine.store)
                engine.save(step)
                report.save(images_per_second=speed.rate())  # progress: a resumed run continues it
            if signals.received:
                raise TrainingStopped(
                    f"stopped by {signal.Signals(signals.received).name} at step {step} of {run.total_steps}; "
                    f"checkpoint {engine.store.latest()} written. Rerun the same command to resume from it.",
                    signals.received,
                )
            if config.eval_every and step % config.eval_every == 0 and step < run.total_steps:
                report.evaluated(step, *engine.evaluate())
            if config.fewshot_every and step % config.fewshot_every == 0 and step < run.total_steps:
                report.fewshot(step, engine.probe())
            engine.between_calls(step)
    report.evaluated(step, *engine.evaluate())
    engine.close()
    if run.fewshot:
        report.fewshot(step, engine.probe())
    report.metrics.update(finished=True, images_per_second=speed.rate())
    return step


def finish(run, model, report, export):
    """Chief only: the final model (.keras), the export and metrics.json, each written so that a
    kill at any point leaves either nothing or a complete file; a rerun completes what is missing
    and never writes a second export of the same step.

    `export(model, export_base, version, trained_on, precision) -> path` writes the TF Serving
    version folder (`export.export_saved_model` on TensorFlow's backend), or returns None with a
    note printed where it cannot."""
    config, metrics = run.config, report.metrics
    about = trained_on(config, run.train_source.class_names).replace(step=metrics["step"])
    metrics["model_path"] = save_keras(model, os.path.join(run.workdir, "model.keras"), about.to_dict())
    if config.export:
        export_base = os.path.join(run.workdir, "export")
        target = os.path.join(export_base, str(metrics["step"]))  # version = step: one export per step
        if os.path.isdir(target):
            log.info("%s exists already (an earlier, interrupted finish): not exported again", target)
            metrics["export_path"] = target
        else:
            metrics["export_path"] = export(model, export_base, metrics["step"], about, config.export_precision)
    report.save()
    exported = "export/, " if metrics.get("export_path") else ""
    print(
        f"Finished step {metrics['step']}: eval top-1 {metrics['eval_top1']:.4f}, top-5 {metrics['eval_top5']:.4f}, "
        f"{metrics['images_per_second'] or 0:.0f} img/s. Workdir: {os.path.abspath(run.workdir)} "
        f"(checkpoints/, tensorboard/, model.keras, {exported}metrics.json)",
        flush=True,
    )
