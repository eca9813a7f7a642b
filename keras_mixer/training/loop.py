"""The one training loop: a custom `strategy.run` step that works on every tf.distribute engine.

Why not `model.fit`: in Keras 3.15 it fails under MultiWorkerMirroredStrategy (FACTS.md), and the
paper's clipping must act on the *global* gradient. Each step:

    per replica:  loss = CE(labels, model(images)) / global batch      (XLA-compiled fwd + bwd)
    all-reduce:   g = sum over replicas of dloss/dw                    (the full-batch gradient)
    clip:         g *= min(1, clip / ||g||)                            (global norm, as the paper)
    apply:        optimizer.apply(g / replicas)   (Keras sums replicas' gradients again itself)

Preemption: a checkpoint (model, optimizer, step, the run's data seed) every `checkpoint_every`
steps and at the end, through `tf.train.CheckpointManager` (data files first, then an atomic
rename of the `checkpoint` index, so a crash mid-write never corrupts "latest"). A restart with
the same workdir restores it and rebuilds the data stream at the same position: epoch e's stream
is a pure function of (run seed, e), and the examples of the finished steps are skipped.
"""

import json
import logging
import math
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from keras_mixer import data
from keras_mixer.models import MlpMixer, create_model, mixer_config
from keras_mixer.training.config import TrainConfig
from keras_mixer.training.schedules import WarmupDecay
from keras_mixer.training.strategy import choose_strategy, is_chief, make_strategy, task_id
from keras_mixer.checkpoints import atomic_write
from keras_mixer.weights import Checkpoint, save_npz

log = logging.getLogger("keras_mixer")


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


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


def _write_json(path, payload):
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2).encode()))


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


def train(config: TrainConfig, strategy=None):
    """Trains as `config` says and returns the final metrics (also in WORKDIR/metrics.json).

    `strategy`: an existing tf.distribute strategy, else one is made from `config.strategy`.
    """
    config.validate()
    if strategy is None:
        kind = choose_strategy(
            config.strategy, config.tpu, os.environ.get("TF_CONFIG"), len(tf.config.list_physical_devices("GPU"))
        )
        strategy = make_strategy(kind, config.tpu)
    else:
        kind = type(strategy).__name__
    chief = is_chief(strategy)
    if config.mixed_precision:
        keras.config.set_dtype_policy(f"mixed_{config.mixed_precision}")
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()
    os.makedirs(config.workdir, exist_ok=True)

    train_source = data.load_source(config.dataset, "train", data_dir=config.data_dir, download=config.download)
    eval_name = data.eval_split(config.dataset, config.data_dir)
    eval_source = data.load_source(
        config.dataset, eval_name, data_dir=config.data_dir, class_names=train_source.class_names
    )
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
    if chief:  # what evaluate.py / export.py need to rebuild the model from a checkpoint
        _write_json(
            os.path.join(config.workdir, "run.json"),
            dict(config=vars(config), architecture=mixer_config(model), class_names=train_source.class_names,
                 num_classes=train_source.num_classes, eval_split=eval_name, total_steps=total_steps),
        )
    # Keras' seed-generator states (stochastic depth, dropout) are not among the variables a
    # tf.train.Checkpoint finds through the model: save them by name, or a resumed run would draw
    # other masks than an uninterrupted one.
    rng_states = {v.path.replace("/", "."): v for v in model.non_trainable_variables if "seed_generator" in v.path}
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, step=step_var, run_seed=run_seed, rng_states=rng_states
    )
    checkpoint_dir = os.path.join(config.workdir, "checkpoints")
    # Every worker must write (collectives); only the chief's copy is kept.
    write_dir = checkpoint_dir if chief else os.path.join(config.workdir, f".tmp_worker_{task_id(strategy)}")
    manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=config.keep_checkpoints)
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    resumed_from = 0
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        resumed_from = int(step_var.numpy())
        log.info("Resumed from %s at step %d of %d", latest, resumed_from, total_steps)
        if chief:
            print(f"Resumed from step {resumed_from} ({latest})", flush=True)

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
    writer = tf.summary.create_file_writer(os.path.join(config.workdir, "tensorboard")) if chief else None
    progress = keras.utils.Progbar(total_steps, stateful_metrics=["loss", "img/s"], verbose=1 if chief else 0)
    history, train_loss, train_top1, rates = [], float("nan"), float("nan"), []
    step = int(step_var.numpy())
    progress.update(step)
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        iterator = iter(epoch_stream(epoch, offset))
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        while step < epoch_end:
            boundary = _next_boundary(step, config, epoch_end)
            count = min(config.steps_per_loop, boundary - step)
            started = time.perf_counter()
            loss, norm, top1 = (float(v) for v in train_steps(iterator, tf.constant(count)))
            elapsed = time.perf_counter() - started
            if not math.isfinite(loss):
                _diverged(f"loss is {loss} at step {step + count}", checkpoint_dir)
            step += count
            rate = count * global_batch / elapsed
            rates.append(rate)
            train_loss, train_top1 = loss, top1
            progress.update(step, [("loss", loss), ("img/s", rate)])
            if step % config.log_every == 0 or step == total_steps:
                history.append([step, loss])
                if writer:
                    with writer.as_default(step=step):
                        tf.summary.scalar("train/loss", loss)
                        tf.summary.scalar("train/top1", top1)
                        tf.summary.scalar("train/learning_rate", float(optimizer.learning_rate))
                        tf.summary.scalar("train/gradient_norm", norm)
                        tf.summary.scalar("train/images_per_second", rate)
            if step % config.checkpoint_every == 0 or step == total_steps:
                # A finite loss can still come with an update that overflowed: never save such weights.
                if not bool(all_finite(model.trainable_variables)):
                    _diverged(f"weights became NaN or Inf at step {step}", checkpoint_dir)
                manager.save(checkpoint_number=step)
            if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                _log_eval(writer, step, evaluate())
    # Steady-state speed: the first calls include tracing and compilation.
    images_per_second = float(np.median(rates[len(rates) // 4 :])) if rates else float("nan")
    top1, top5 = evaluate()
    _log_eval(writer, step, (top1, top5))
    metrics = dict(
        step=step,
        total_steps=total_steps,
        train_loss=train_loss,
        train_top1=train_top1,
        eval_top1=top1,
        eval_top5=top5,
        eval_split=eval_name,
        images_per_second=images_per_second,
        loss_history=history,
        resumed_from_step=resumed_from,
        model=config.model,
        dataset=config.dataset,
        strategy=kind,
        replicas=replicas,
        xla=use_xla,
    )
    if not chief and os.path.isdir(write_dir):
        shutil.rmtree(write_dir, ignore_errors=True)
    if config.write_worker_weights:
        folder = config.workdir if chief else os.path.join(config.workdir, f"worker_{task_id(strategy)}")
        os.makedirs(folder, exist_ok=True)
        save_npz(model, os.path.join(folder, "final_weights.npz"))
    if chief:
        _finish(model, config, metrics, train_source.class_names)
    return metrics


@tf.function
def all_finite(variables):
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables])


def _diverged(what, checkpoint_dir):
    last = tf.train.latest_checkpoint(checkpoint_dir)
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


def _finish(model, config, metrics, class_names):
    """Chief only: the final model (.keras), the export and metrics.json."""
    model_path = os.path.join(config.workdir, "model.keras")
    model.save(model_path)
    metrics["model_path"] = model_path
    if config.export:
        from keras_mixer.export import export_saved_model

        metrics["export_path"] = export_saved_model(
            model, os.path.join(config.workdir, "export"), class_names=class_names
        )
    _write_json(os.path.join(config.workdir, "metrics.json"), metrics)
    print(
        f"Finished step {metrics['step']}: eval top-1 {metrics['eval_top1']:.4f}, top-5 {metrics['eval_top5']:.4f}, "
        f"{metrics['images_per_second']:.0f} img/s. Workdir: {os.path.abspath(config.workdir)} "
        f"(checkpoints/, tensorboard/, model.keras, export/, metrics.json)",
        flush=True,
    )
