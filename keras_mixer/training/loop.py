"""The one training loop, on every tf.distribute engine: setup, steps, checkpoints, reports, finish.

    train(config)
      -> lock the workdir (one owner), catch SIGTERM/SIGINT
      -> _prepare: leftovers out, recipe checked against run.json, data sources, run length
      -> _build: model (fresh or from weights), optimizer, training state, CheckpointStore;
                 restore the newest checkpoint that restores completely
      -> _run: host calls of `steps_per_loop` steps (step.make_train_steps), each followed by the
               report, a checkpoint, an evaluation and a few-shot probe when due
      -> _finish: final evaluation (and probe), model.keras, the export, metrics.json

Preemption: a checkpoint (model, optimizer, step, the run's data seed, the dropout/drop-path RNG
states) every `checkpoint_every` steps and at the end. A restart with the same workdir restores the
newest intact checkpoint and rebuilds the data stream at the same position: epoch e's stream is a
pure function of (run seed, e), and the examples of the finished steps are skipped.
"""

import dataclasses
import logging
import math
import os
import signal
import threading
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from keras_mixer import data, loader
from keras_mixer.files import read_json, write_json
from keras_mixer.models import MlpMixer
from keras_mixer.trained_on import TrainedOn
from keras_mixer.training.checkpointing import CheckpointStore, NoCheckpointRestores, has_checkpoint_files
from keras_mixer.training.config import TrainConfig, check_resumed_recipe, run_length
from keras_mixer.training.evaluation import make_evaluator
from keras_mixer.training.fewshot import TRAINING_DRAWS, FewshotProbe, features_function
from keras_mixer.training.reporting import Report, Throughput
from keras_mixer.training.step import all_finite, decide_xla, make_optimizer, make_train_steps, set_mixed_precision
from keras_mixer.training.strategy import choose_strategy, is_chief, make_strategy, replica_devices, task_id
from keras_mixer.training.workdir import WorkdirLock, check_workdir, move_to_previous, remove_leftovers
from keras_mixer.weights import save_keras, save_npz

log = logging.getLogger("keras_mixer")


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class TrainingStopped(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint of the current step was written first."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


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
class _Run:
    """What `_prepare` works out before anything is built."""

    config: TrainConfig
    strategy: object
    kind: str
    chief: bool
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


def train(config: TrainConfig, strategy=None, restart=False, accept_changes=()):
    """Trains as `config` says and returns the final metrics (also in WORKDIR/metrics.json).

    Args:
        strategy: an existing tf.distribute strategy, else one is made from `config.strategy`.
        restart: start again from step 0 even though the workdir holds a run; its files are moved
            to WORKDIR/previous/<time>/ first (nothing is deleted).
        accept_changes: recipe fields allowed to differ from the run's recorded recipe on resume
            (or "all"); the changes are recorded in run.json.

    A workdir has one owner (WORKDIR/lock). A workdir with checkpoints resumes from the newest one
    that restores, after checking the recipe; one whose run already finished is left as it is.
    """
    config.validate()
    backend = keras.backend.backend()
    if backend != "tensorflow":  # checked before anything is written
        raise ValueError(
            f"the trainers run on Keras' TensorFlow backend, and this process has KERAS_BACKEND={backend}: unset "
            f"it or set KERAS_BACKEND=tensorflow. On the {backend} backend, train in Python with "
            f"keras_mixer.JaxTrainStep (see the training docs)"
        )
    if strategy is None:
        kind = choose_strategy(
            config.strategy, config.tpu, os.environ.get("TF_CONFIG"), len(tf.config.list_physical_devices("GPU"))
        )
        strategy = make_strategy(kind, config.tpu)
    else:
        kind = type(strategy).__name__
    check_workdir(config.workdir)
    if is_chief(strategy):
        devices = ", ".join(replica_devices(strategy))
        print(f"Keras on {backend}, {kind} strategy, {strategy.num_replicas_in_sync} replica(s): {devices}", flush=True)
    lock = WorkdirLock(config.workdir).acquire() if is_chief(strategy) else None
    multi_worker = getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)()
    try:
        with StopSignals(enabled=not multi_worker) as signals:
            run = _prepare(config, strategy, kind, restart, tuple(accept_changes))
            return _train(run, signals)
    finally:
        if lock is not None:
            lock.release()


def _prepare(config, strategy, kind, restart, accept_changes):
    """Workdir housekeeping, the recipe check, the data sources and the run's length."""
    chief = is_chief(strategy)
    workdir = config.workdir
    if chief:
        remove_leftovers(workdir)
        if restart:
            moved = move_to_previous(workdir)
            if moved:
                print(f"--restart: the earlier run's files were moved to {moved}", flush=True)
    record = read_json(os.path.join(workdir, "run.json"))
    changes = []
    if has_checkpoint_files(os.path.join(workdir, "checkpoints")):
        changes = check_resumed_recipe(record and record.get("config"), config, accept_changes)
    set_mixed_precision(config.mixed_precision)
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()

    train_source = data.load_source(config.dataset, "train", data_dir=config.data_dir, download=config.download)
    eval_split = data.eval_split(config.dataset, config.data_dir)
    eval_source = data.load_source(
        config.dataset, eval_split, data_dir=config.data_dir, class_names=train_source.class_names
    )
    if chief:
        for source in (train_source, eval_source):
            if source.problems():
                print(f"warning: {source.describe_problems()}", flush=True)
        if config.crop_area_min >= 1 and config.eval_resize == "crop":
            print(
                f"warning: training sees whole images (crop_area_min 1) but evaluation centre-crops them "
                f"(eval_resize crop, crop_ratio {config.crop_ratio}), showing objects larger than training did; "
                f"--eval_resize resize matches training",
                flush=True,
            )
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {replicas} replicas")
    total_steps, steps_per_epoch = run_length(config, train_source.num_examples)
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
    return _Run(
        config,
        strategy,
        kind,
        chief,
        record,
        changes,
        train_source,
        eval_source,
        eval_split,
        total_steps,
        steps_per_epoch,
        fewshot,
    )


def _build(run):
    """(model, optimizer, step variable, run seed variable, CheckpointStore), restored from the
    newest intact checkpoint if there is one."""
    config = run.config
    with run.strategy.scope():
        model = build_model(config, run.train_source.num_classes)
        optimizer = make_optimizer(run.total_steps, model.trainable_variables, **config.optimizer_args())
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        first_seed = config.seed if config.seed is not None else int(np.random.default_rng().integers(2**31 - 1))
        run_seed = tf.Variable(first_seed, dtype=tf.int64, trainable=False, name="run_seed")
    # Keras' seed-generator states (stochastic depth, dropout) are not among the variables a
    # tf.train.Checkpoint finds through the model: save them by name, or a resumed run would draw
    # other masks than an uninterrupted one.
    rng_states = {v.path.replace("/", "."): v for v in model.non_trainable_variables if "seed_generator" in v.path}
    state = tf.train.Checkpoint(
        model=model, optimizer=optimizer, step=step_var, run_seed=run_seed, rng_states=rng_states
    )
    # Every worker must write (saving is collective); only the chief's copy is kept.
    write_dir = None if run.chief else os.path.join(run.workdir, f".tmp_worker_{task_id(run.strategy)}")
    folder = os.path.join(run.workdir, "checkpoints")
    store = CheckpointStore(state, folder, config.keep_checkpoints, write_dir)
    return model, optimizer, step_var, run_seed, store


def _write_record(run, model, resumed_from):
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


def _resume(run, store):
    """Restores the newest intact checkpoint into the built model: (the step restored, None for a
    fresh start; the run's metrics.json so far, {} for none). A run whose checkpoints were all moved
    to broken/ earlier is refused (NoCheckpointRestores) rather than silently restarted."""
    resumed_from = store.restore_newest()
    if resumed_from is None and has_checkpoint_files(store.directory):
        raise NoCheckpointRestores(
            f"{store.directory} holds only checkpoints that were moved to broken/ earlier; pass --restart to "
            f"start again from step 0 (the current files are moved to WORKDIR/previous/, not deleted)"
        )
    if resumed_from is None:
        return None, {}
    log.info("Resumed from ckpt-%d of %d steps", resumed_from, run.total_steps)
    return resumed_from, read_json(os.path.join(run.workdir, "metrics.json")) or {}


def _report(run, step, resumed_from, previous, use_xla):
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
        replicas=run.strategy.num_replicas_in_sync,
        xla=use_xla,
        data_problems=data_problems,
        fewshot=None,
    )
    return Report(run.workdir, run.chief, run.total_steps, metrics)


def _train(run, signals):
    config, strategy = run.config, run.strategy
    model, optimizer, step_var, run_seed, store = _build(run)
    resumed_from, previous = _resume(run, store)
    if resumed_from is not None and resumed_from >= run.total_steps and previous.get("finished"):
        if run.chief:
            print(
                f"The run in {os.path.abspath(run.workdir)} already finished at step {previous.get('step')} "
                f"(eval top-1 {previous.get('eval_top1')}): nothing to do, nothing rewritten. Give a larger --steps "
                f"with --accept_changes=steps to train further, or --restart to start again.",
                flush=True,
            )
        return previous
    if run.chief:
        if resumed_from is not None:
            print(f"Resumed from step {resumed_from} ({store.latest()})", flush=True)
        _write_record(run, model, resumed_from)

    use_xla, xla_reason = decide_xla(config.xla, config.mixed_precision, run.kind)
    if run.chief:
        print(f"XLA {'on' if use_xla else 'off'} for the training step: {xla_reason}", flush=True)
    train_steps = make_train_steps(strategy, model, optimizer, step_var, use_xla=use_xla, **config.step_args())
    evaluate = make_evaluator(
        strategy,
        lambda images: model(images, training=False),
        run.eval_source,
        config.batch_size,
        config.image_size,
        config.eval_preprocessing,
    )
    # The probe reads the model in inference mode only: no dropout or drop-path draws, no training data.
    fewshot_features = features_function(model) if run.fewshot else None
    step = int(step_var.numpy())
    report = _report(run, step, resumed_from, previous, use_xla)
    speed = Throughput(config.batch_size)
    while step < run.total_steps:
        epoch, offset = divmod(step, run.steps_per_epoch)
        iterator = iter(_epoch_stream(run, int(run_seed.numpy()), epoch, offset))
        epoch_end = min((epoch + 1) * run.steps_per_epoch, run.total_steps)
        speed.restart()  # a new input stream fills its buffers first
        while step < epoch_end:
            count = min(config.steps_per_loop, _next_boundary(step, config, epoch_end) - step)
            speed.start()
            loss, norm, top1 = (float(v) for v in train_steps(iterator, tf.constant(count)))
            rate = speed.stop(count)
            if not math.isfinite(loss):
                _diverged(f"loss is {loss} at step {step + count}", store)
            step += count
            log_point = step % config.log_every == 0 or step == run.total_steps
            learning_rate = float(optimizer.learning_rate) if log_point else None
            report.trained(step, loss, top1, norm, learning_rate, rate, log_point)
            if step % config.checkpoint_every == 0 or step == run.total_steps or signals.received:
                # A finite loss can still come with an update that overflowed: never save such weights.
                if not bool(all_finite(model.trainable_variables)):
                    _diverged(f"weights became NaN or Inf at step {step}", store)
                store.save(step)
                report.save(images_per_second=speed.rate())  # progress: a resumed run continues it
            if signals.received:
                raise TrainingStopped(
                    f"stopped by {signal.Signals(signals.received).name} at step {step} of {run.total_steps}; "
                    f"checkpoint {store.latest()} written. Rerun the same command to resume from it.",
                    signals.received,
                )
            if config.eval_every and step % config.eval_every == 0 and step < run.total_steps:
                report.evaluated(step, *evaluate())
            if config.fewshot_every and step % config.fewshot_every == 0 and step < run.total_steps:
                report.fewshot(step, run.fewshot(fewshot_features))
    report.evaluated(step, *evaluate())
    if run.fewshot:
        report.fewshot(step, run.fewshot(fewshot_features))
    report.metrics.update(finished=True, images_per_second=speed.rate())
    store.discard_worker_copies()
    if config.write_worker_weights:
        folder = run.workdir if run.chief else os.path.join(run.workdir, f"worker_{task_id(strategy)}")
        os.makedirs(folder, exist_ok=True)
        save_npz(model, os.path.join(folder, "final_weights.npz"))
    if run.chief:
        _finish(run, model, report)
    return report.metrics


def recipe_stream(strategy, source, config, seed, **kwargs):
    """The recipe's training batches of `source` under `strategy`: its batch size, image size,
    shuffle buffer, augmentation and one-hot labels, seeded by `seed`. `kwargs`: more
    `train_pipeline` arguments (cache, skip_steps, permutation)."""
    return data.distribute(
        strategy,
        source,
        batch_size=config.batch_size,
        training=True,
        image_size=config.image_size,
        seed=seed,
        shuffle_buffer=config.shuffle_buffer,
        randaugment=config.randaugment,
        mixup=config.mixup,
        one_hot=True,
        area_range=(config.crop_area_min, 1.0),
        flip=config.flip,
        **kwargs,
    )


def _epoch_stream(run, run_seed, epoch, skip_steps):
    """Epoch `epoch`'s training batches, a pure function of (run seed, epoch), from `skip_steps` on."""
    seed = run_seed * 100_003 + epoch
    config = run.config
    return recipe_stream(run.strategy, run.train_source, config, seed, cache=config.cache, skip_steps=skip_steps)


def _diverged(what, store):
    last = store.latest()
    raise TrainingDiverged(
        f"{what}: training stopped. The last good checkpoint ({last or 'none yet'}) is kept; lower the "
        f"learning rate or check the data, then rerun with the same --workdir to resume from it."
    )


def _next_boundary(step, config, epoch_end):
    """The next step at which the loop must stop to log, checkpoint, evaluate, probe or change epoch."""
    candidates = [epoch_end, (step // config.checkpoint_every + 1) * config.checkpoint_every]
    candidates.append((step // config.log_every + 1) * config.log_every)
    for every in (config.eval_every, config.fewshot_every):
        if every:
            candidates.append((step // every + 1) * every)
    return min(candidates)


def _finish(run, model, report):
    """Chief only: the final model (.keras), the export and metrics.json, each written so that a
    kill at any point leaves either nothing or a complete file; a rerun completes what is missing
    and never writes a second export of the same step."""
    config, metrics = run.config, report.metrics
    about = trained_on(config, run.train_source.class_names).replace(step=metrics["step"])
    metrics["model_path"] = save_keras(model, os.path.join(run.workdir, "model.keras"), about.to_dict())
    if config.export:
        from keras_mixer.export import export_saved_model

        export_base = os.path.join(run.workdir, "export")
        target = os.path.join(export_base, str(metrics["step"]))  # version = step: one export per step
        if os.path.isdir(target):
            log.info("%s exists already (an earlier, interrupted finish): not exported again", target)
            metrics["export_path"] = target
        else:
            metrics["export_path"] = export_saved_model(
                model,
                export_base,
                version=metrics["step"],
                trained_on=about,
                precision=config.export_precision,
            )
    report.save()
    print(
        f"Finished step {metrics['step']}: eval top-1 {metrics['eval_top1']:.4f}, top-5 {metrics['eval_top5']:.4f}, "
        f"{metrics['images_per_second'] or 0:.0f} img/s. Workdir: {os.path.abspath(run.workdir)} "
        f"(checkpoints/, tensorboard/, model.keras, {'export/, ' if config.export else ''}metrics.json)",
        flush=True,
    )
