"""The one training loop: a custom `strategy.run` step that works on every tf.distribute engine.

Why not `model.fit`: in Keras 3.15 it fails under MultiWorkerMirroredStrategy (FACTS.md), and the
paper's clipping must act on the *global* gradient. Each step:

    per replica:  loss = CE(labels, model(images)) / global batch      (XLA-compiled fwd + bwd)
    all-reduce:   g = sum over replicas of dloss/dw                    (the full-batch gradient)
    clip:         g *= min(1, clip / ||g||)                            (global norm, as the paper)
    apply:        optimizer.apply(g / replicas)   (Keras sums replicas' gradients again itself)

Preemption: a checkpoint (model, optimizer, step, the run's data seed) every `checkpoint_every`
steps and at the end (`checkpointing.CheckpointStore`). A restart with the same workdir restores
the newest checkpoint that restores completely and rebuilds the data stream at the same position:
epoch e's stream is a pure function of (run seed, e), and the examples of the finished steps are
skipped. The workdir has one owner at a time and its recipe is checked on resume (`workdir`).
"""

import dataclasses
import logging
import math
import os
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from keras_mixer import data
from keras_mixer.models import MlpMixer, create_model, mixer_config
from keras_mixer.files import read_json, write_json
from keras_mixer.training.checkpointing import CheckpointStore, NoCheckpointRestores, has_checkpoint_files
from keras_mixer.training.config import TrainConfig, check_resumed_recipe
from keras_mixer.training.schedules import WarmupDecay
from keras_mixer.training.strategy import choose_strategy, is_chief, make_strategy, task_id
from keras_mixer.training.workdir import WorkdirLock, check_workdir, move_to_previous, remove_leftovers
from keras_mixer.weights import Checkpoint, save_keras, save_npz

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


# --- building blocks ------------------------------------------------------------------------------


def make_optimizer(config, total_steps):
    """AdamW (pre-training) or SGD with momentum (fine-tuning) on the recipe's schedule.

    Clipping is not set here: the loop clips the all-reduced gradient. Weight decay is decoupled
    (Keras AdamW: w -= lr * wd * w) and spares biases and LayerNorm parameters.
    """
    decay = "linear" if config.schedule == "warmup_linear" else "cosine"
    schedule = WarmupDecay(config.learning_rate, config.warmup_steps, total_steps, decay)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=config.momentum)
    optimizer = keras.optimizers.AdamW(
        schedule, weight_decay=config.weight_decay, beta_1=config.beta_1, beta_2=config.beta_2
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def clip_by_global_norm(gradients, max_norm):
    """(gradients scaled so their global norm is at most `max_norm`, the norm before clipping).
    `max_norm` None: no clipping."""
    norm = tf.linalg.global_norm(gradients)
    if max_norm is None:
        return gradients, norm
    scale = tf.minimum(1.0, max_norm / tf.maximum(norm, 1e-12))
    return [g * scale for g in gradients], norm


def build_model(config, num_classes):
    """The Mixer to train: fresh (pre-training) or from `config.init` with a zero head and, for a
    larger `image_size`, the block-diagonal resolution expansion (fine-tuning). Outputs logits."""
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
        return create_model(config.model, **common)
    if config.model is None:  # a .keras init carries its architecture
        checkpoint = Checkpoint(config.init)  # read once: architecture and weights
        if checkpoint.source_model is None:
            raise ValueError(f"--init {config.init!r} is not a .keras file: give --model")
        arch = mixer_config(checkpoint.source_model)
        arch = {k: arch[k] for k in ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim")}
        return MlpMixer(**arch, weights=checkpoint, name="mixer_finetuned", **common)
    return create_model(config.model, weights=config.init, **common)


def decide_xla(config, kind):
    """XLA for the forward/backward pass, on purpose: Keras' jit_compile="auto" would turn it off on
    CPU and under tf.distribute, yet it is faster there (Mixer-B/16 on 2 CPU cores: 4.71 vs 4.43
    img/s in this loop, benchmarks/xla_training.py). TPUs compile everything anyway."""
    if config.xla == "auto":
        on = kind != "tpu"
    else:
        on = config.xla == "on"
    log.info("XLA %s for the forward/backward pass (--xla=%s, strategy %s)", "on" if on else "off", config.xla, kind)
    return on


# --- the loop -------------------------------------------------------------------------------------


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
    if strategy is None:
        kind = choose_strategy(
            config.strategy, config.tpu, os.environ.get("TF_CONFIG"), len(tf.config.list_physical_devices("GPU"))
        )
        strategy = make_strategy(kind, config.tpu)
    else:
        kind = type(strategy).__name__
    check_workdir(config.workdir)
    lock = WorkdirLock(config.workdir).acquire() if is_chief(strategy) else None
    multi_worker = getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)()
    try:
        with StopSignals(enabled=not multi_worker) as signals:
            return _train(config, strategy, kind, restart, tuple(accept_changes), signals)
    finally:
        if lock is not None:
            lock.release()


def _train(config, strategy, kind, restart, accept_changes, signals):
    chief = is_chief(strategy)
    workdir = config.workdir
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    run_path, metrics_path = os.path.join(workdir, "run.json"), os.path.join(workdir, "metrics.json")
    if chief:
        remove_leftovers(workdir)
        if restart:
            moved = move_to_previous(workdir)
            if moved:
                print(f"--restart: the earlier run's files were moved to {moved}", flush=True)
    record = read_json(run_path)
    changes = []
    if has_checkpoint_files(checkpoint_dir):
        changes = check_resumed_recipe(record and record.get("config"), config, accept_changes)
    if config.mixed_precision:
        keras.config.set_dtype_policy(f"mixed_{config.mixed_precision}")
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()

    train_source = data.load_source(config.dataset, "train", data_dir=config.data_dir, download=config.download)
    eval_name = data.eval_split(config.dataset, config.data_dir)
    eval_source = data.load_source(
        config.dataset, eval_name, data_dir=config.data_dir, class_names=train_source.class_names
    )
    data_problems = {s.split: s.problems() for s in (train_source, eval_source) if s.problems()}
    if chief:
        for source in (train_source, eval_source):
            if source.problems():
                print(f"warning: {source.describe_problems()}", flush=True)
    global_batch = config.batch_size
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {replicas} replicas")
    steps_per_epoch = max(1, (train_source.num_examples or 0) // global_batch) if train_source.num_examples else None
    if config.steps is not None:
        total_steps = int(config.steps)
    elif steps_per_epoch is None:
        raise ValueError(f"the size of {config.dataset!r} is unknown: give --steps instead of --epochs")
    else:
        total_steps = max(1, int(math.ceil(config.epochs * steps_per_epoch)))
    steps_per_epoch = steps_per_epoch or total_steps  # an unknown size: one long epoch

    with strategy.scope():
        model = build_model(config, train_source.num_classes)
        optimizer = make_optimizer(config, total_steps)
        if config.mixed_precision == "float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        first_seed = config.seed if config.seed is not None else int(np.random.default_rng().integers(2**31 - 1))
        run_seed = tf.Variable(first_seed, dtype=tf.int64, trainable=False, name="run_seed")
    # Keras' seed-generator states (stochastic depth, dropout) are not among the variables a
    # tf.train.Checkpoint finds through the model: save them by name, or a resumed run would draw
    # other masks than an uninterrupted one.
    rng_states = {v.path.replace("/", "."): v for v in model.non_trainable_variables if "seed_generator" in v.path}
    state = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var, run_seed=run_seed, rng_states=rng_states)
    # Every worker must write (saving is collective); only the chief's copy is kept.
    write_dir = None if chief else os.path.join(workdir, f".tmp_worker_{task_id(strategy)}")
    store = CheckpointStore(state, checkpoint_dir, config.keep_checkpoints, write_dir)
    resumed_from = store.restore_newest()
    if resumed_from is None and has_checkpoint_files(checkpoint_dir):
        raise NoCheckpointRestores(
            f"{checkpoint_dir} holds only checkpoints that were moved to broken/ earlier; pass --restart to "
            f"start again from step 0 (the current files are moved to WORKDIR/previous/, not deleted)"
        )
    previous = read_json(metrics_path) if resumed_from is not None else None
    if resumed_from is not None and resumed_from >= total_steps and previous and previous.get("finished"):
        if chief:
            print(
                f"The run in {os.path.abspath(workdir)} already finished at step {previous.get('step')} "
                f"(eval top-1 {previous.get('eval_top1')}): nothing to do, nothing rewritten. Give a larger --steps "
                f"with --accept_changes=steps to train further, or --restart to start again.",
                flush=True,
            )
        return previous
    if resumed_from is not None:
        log.info("Resumed from ckpt-%d of %d steps", resumed_from, total_steps)
        if chief:
            print(f"Resumed from step {resumed_from} ({store.latest()})", flush=True)
    if chief:
        if resumed_from is None or record is None:
            record = dict(
                config=dataclasses.asdict(config), architecture=mixer_config(model), class_names=train_source.class_names,
                num_classes=train_source.num_classes, dataset=config.dataset, eval_split=eval_name,
                total_steps=total_steps, recipe_changes=[],
            )  # fmt: skip
        if changes:
            record["recipe_changes"] = record.get("recipe_changes", []) + [
                dict(step=resumed_from, field=name, recorded=old, now=new) for name, old, new in changes
            ]
            record.update(config=dataclasses.asdict(config), total_steps=total_steps)
            print(f"Accepted recipe changes at step {resumed_from}: " + ", ".join(f"{n} {o!r} -> {v!r}" for n, o, v in changes))
        write_json(run_path, record)  # what evaluate.py / export.py need to rebuild the model

    use_xla = decide_xla(config, kind)
    fp16 = config.mixed_precision == "float16"
    clip = config.grad_clip_norm

    def forward_backward(images, labels):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            per_example = keras.losses.categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss) if fp16 else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        correct = tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == tf.argmax(labels, -1), tf.float32))
        return loss, gradients, correct

    forward_backward_fn = tf.function(forward_backward, jit_compile=True) if use_xla else forward_backward

    def replica_step(images, labels):
        loss, gradients, correct = forward_backward_fn(images, labels)
        gradients = tf.distribute.get_replica_context().all_reduce("sum", gradients)
        if fp16:  # clip the true gradient; the loss-scale optimizer unscales and skips overflows
            unscaled, norm = clip_by_global_norm([g / optimizer.dynamic_scale for g in gradients], clip)
            gradients = [g * optimizer.dynamic_scale for g in unscaled]
        else:
            gradients, norm = clip_by_global_norm(gradients, clip)
        optimizer.apply([g / replicas for g in gradients], model.trainable_variables)
        return loss, norm, correct

    @tf.function
    def train_steps(iterator, count):
        loss_sum, norm_sum, correct_sum = tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)
        for _ in tf.range(count):
            images, labels = next(iterator)
            loss, norm, correct = strategy.run(replica_step, args=(images, labels))
            loss_sum += strategy.reduce("SUM", loss, axis=None)
            norm_sum += strategy.reduce("MEAN", norm, axis=None)
            correct_sum += strategy.reduce("SUM", correct, axis=None)
            step_var.assign_add(1)
        count = tf.cast(count, tf.float32)
        return loss_sum / count, norm_sum / count, correct_sum / (count * global_batch)

    def epoch_stream(epoch, skip_steps):
        return data.distribute(
            strategy,
            train_source,
            batch_size=global_batch,
            training=True,
            image_size=config.image_size,
            seed=int(run_seed.numpy()) * 100_003 + epoch,
            shuffle_buffer=config.shuffle_buffer,
            cache=config.cache,
            randaugment=config.randaugment,
            mixup=config.mixup,
            one_hot=True,
            area_range=(config.crop_area_min, 1.0),
            flip=config.flip,
            skip_steps=skip_steps,
        )

    evaluate = make_evaluator(
        strategy, lambda images: model(images, training=False), eval_source, global_batch, config.image_size,
        config.eval_resize, config.crop_ratio,
    )
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard")) if chief else None
    progress = keras.utils.Progbar(total_steps, stateful_metrics=["loss", "img/s"], verbose=1 if chief else 0)
    step = int(step_var.numpy())
    # The loss history of the steps before the restored checkpoint survives in metrics.json.
    history = [h for h in (previous or {}).get("loss_history", []) if h[0] <= step]
    train_loss, train_top1 = (previous or {}).get("train_loss"), (previous or {}).get("train_top1")
    metrics = dict(
        finished=False, step=step, total_steps=total_steps, train_loss=train_loss, train_top1=train_top1,
        eval_top1=None, eval_top5=None, eval_split=eval_name, images_per_second=None, loss_history=history,
        resumed_from_step=resumed_from or 0, model=config.model, dataset=config.dataset, strategy=kind,
        replicas=replicas, xla=use_xla, data_problems=data_problems,
    )  # fmt: skip
    speed = Throughput(global_batch)
    progress.update(step)
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        iterator = iter(epoch_stream(epoch, offset))
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        speed.restart()  # a new input stream fills its buffers first
        while step < epoch_end:
            boundary = _next_boundary(step, config, epoch_end)
            count = min(config.steps_per_loop, boundary - step)
            speed.start()
            loss, norm, top1 = (float(v) for v in train_steps(iterator, tf.constant(count)))
            rate = speed.stop(count)
            if not math.isfinite(loss):
                _diverged(f"loss is {loss} at step {step + count}", store)
            step += count
            train_loss, train_top1 = loss, top1
            progress.update(step, [("loss", loss)] + ([("img/s", rate)] if rate else []))
            if step % config.log_every == 0 or step == total_steps:
                history.append([step, loss])
                if writer:
                    with writer.as_default(step=step):
                        tf.summary.scalar("train/loss", loss)
                        tf.summary.scalar("train/top1", top1)
                        tf.summary.scalar("train/learning_rate", float(optimizer.learning_rate))
                        tf.summary.scalar("train/gradient_norm", norm)
                        if rate:
                            tf.summary.scalar("train/images_per_second", rate)
            if step % config.checkpoint_every == 0 or step == total_steps or signals.received:
                # A finite loss can still come with an update that overflowed: never save such weights.
                if not bool(all_finite(model.trainable_variables)):
                    _diverged(f"weights became NaN or Inf at step {step}", store)
                store.save(step)
                metrics.update(step=step, train_loss=train_loss, train_top1=train_top1, images_per_second=speed.rate())
                if chief:  # progress: a resumed run continues this history
                    write_json(metrics_path, metrics)
            if signals.received:
                name = signal.Signals(signals.received).name
                raise TrainingStopped(
                    f"stopped by {name} at step {step} of {total_steps}; checkpoint {store.latest()} written. "
                    f"Rerun the same command to resume from it.",
                    signals.received,
                )
            if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                _log_eval(writer, step, evaluate())
    top1, top5 = evaluate()
    _log_eval(writer, step, (top1, top5))
    metrics.update(
        finished=True, step=step, train_loss=train_loss, train_top1=train_top1, eval_top1=top1, eval_top5=top5,
        images_per_second=speed.rate(),
    )  # fmt: skip
    store.discard_worker_copies()
    if config.write_worker_weights:
        folder = workdir if chief else os.path.join(workdir, f"worker_{task_id(strategy)}")
        os.makedirs(folder, exist_ok=True)
        save_npz(model, os.path.join(folder, "final_weights.npz"))
    if chief:
        _finish(model, config, metrics, train_source.class_names, metrics_path)
    return metrics


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


@tf.function
def all_finite(variables):
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables])


def _diverged(what, store):
    last = store.latest()
    raise TrainingDiverged(
        f"{what}: training stopped. The last good checkpoint ({last or 'none yet'}) is kept; lower the "
        f"learning rate or check the data, then rerun with the same --workdir to resume from it."
    )


def _next_boundary(step, config, epoch_end):
    """The next step at which the loop must stop to log, checkpoint, evaluate or change epoch."""
    candidates = [epoch_end, (step // config.checkpoint_every + 1) * config.checkpoint_every]
    candidates.append((step // config.log_every + 1) * config.log_every)
    if config.eval_every:
        candidates.append((step // config.eval_every + 1) * config.eval_every)
    return min(candidates)


def _log_eval(writer, step, result):
    top1, top5 = result
    log.info("step %d: eval top-1 %.4f, top-5 %.4f", step, top1, top5)
    if writer:
        with writer.as_default(step=step):
            tf.summary.scalar("eval/top1", top1)
            tf.summary.scalar("eval/top5", top5)


def make_evaluator(strategy, predict, source, batch_size, image_size, eval_resize="crop", crop_ratio=0.875):
    """() -> (top-1, top-5) over the whole split, as fractions, on every replica at once.

    `predict`: images float32 [B, H, W, 3] in [0, 255] -> scores [B, classes] (logits or
    probabilities). Every worker runs the same number of full, padded batches.
    """
    workers = strategy.extended._num_workers if hasattr(strategy.extended, "_num_workers") else 1
    per_worker = math.ceil(source.num_examples / workers) if source.num_examples else None
    if per_worker is None:
        raise ValueError(f"evaluation needs the size of {source.name!r} split {source.split!r}")
    local_batch = batch_size // workers
    steps = max(1, math.ceil(per_worker / local_batch))
    k = min(5, source.num_classes)

    def replica_eval(images, labels, mask):
        logits = tf.cast(predict(images), tf.float32)
        top1 = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32) * mask
        topk = tf.cast(tf.math.in_top_k(labels, logits, k), tf.float32) * mask
        return tf.reduce_sum(top1), tf.reduce_sum(topk), tf.reduce_sum(mask)

    @tf.function
    def run(iterator):
        totals = tf.zeros([3])
        for _ in tf.range(steps):
            images, labels, mask = next(iterator)
            per_replica = strategy.run(replica_eval, args=(images, labels, mask))
            totals += tf.stack([strategy.reduce("SUM", v, axis=None) for v in per_replica])
        return totals

    def evaluate():
        stream = data.distribute(
            strategy,
            source,
            batch_size=batch_size,
            training=False,
            image_size=image_size,
            eval_resize=eval_resize,
            crop_ratio=crop_ratio,
            pad_to_steps=steps,
        )
        top1, top5, count = (float(v) for v in run(iter(stream)))
        return top1 / count, top5 / count

    return evaluate


def _finish(model, config, metrics, class_names, metrics_path):
    """Chief only: the final model (.keras), the export and metrics.json, each written so that a
    kill at any point leaves either nothing or a complete file; a rerun completes what is missing
    and never writes a second export of the same step."""
    workdir = config.workdir
    about = run_metadata(config, class_names, metrics["step"])
    metrics["model_path"] = save_keras(model, os.path.join(workdir, "model.keras"), about)
    if config.export:
        from keras_mixer.export import export_saved_model

        export_base = os.path.join(workdir, "export")
        target = os.path.join(export_base, str(metrics["step"]))  # version = step: one export per step
        if os.path.isdir(target):
            log.info("%s exists already (an earlier, interrupted finish): not exported again", target)
            metrics["export_path"] = target
        else:
            metrics["export_path"] = export_saved_model(
                model, export_base, version=metrics["step"], class_names=class_names, crop_ratio=config.crop_ratio,
                eval_resize=config.eval_resize, metadata=about,
            )  # fmt: skip
    write_json(metrics_path, metrics)
    print(
        f"Finished step {metrics['step']}: eval top-1 {metrics['eval_top1']:.4f}, top-5 {metrics['eval_top5']:.4f}, "
        f"{metrics['images_per_second'] or 0:.0f} img/s. Workdir: {os.path.abspath(workdir)} "
        f"(checkpoints/, tensorboard/, model.keras, export/, metrics.json)",
        flush=True,
    )


def run_metadata(config, class_names, step):
    """What a trained model needs to be evaluated and served as it was trained: recorded with it."""
    return dict(
        dataset=config.dataset, class_names=class_names, eval_resize=config.eval_resize, crop_ratio=config.crop_ratio,
        step=step, model=config.model,
    )  # fmt: skip
