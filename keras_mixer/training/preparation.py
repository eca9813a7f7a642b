"""What a training run works out before its first step, the same on either Keras backend
(`loop` runs it): the workdir's housekeeping, the recipe checked against run.json, the data
sources and the run's length (`prepare` -> `Run`); the model to train (`build_model`); run.json
(`write_record`); where a resumed run stands (`previous_metrics`, `already_finished`); and the
recipe's input stream (`recipe_pipeline_args`, `epoch_seed`), which both engines read.
"""

import dataclasses
import logging
import os
from typing import Optional

import keras

from keras_mixer import data
from keras_mixer.atomic_files import read_json, write_json
from keras_mixer.model.mixer import MlpMixer
from keras_mixer.model.trained_on import TrainedOn
from keras_mixer.training.checkpoint_store import checkpoint_backend
from keras_mixer.training.config import TrainConfig, check_resumed_recipe, run_length
from keras_mixer.training.fewshot import TRAINING_DRAWS, FewshotProbe
from keras_mixer.training.optimizer import set_mixed_precision
from keras_mixer.training.sizing import fit_to_data, keep_decided, scale_to_length
from keras_mixer.training.workdir import move_to_previous, remove_leftovers
from keras_mixer.weights_io import loader

log = logging.getLogger("keras_mixer")
# A band of evaluation crop ratios wider than this giving one crop is worth a warning.
COARSE_CROPS = 0.05


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
