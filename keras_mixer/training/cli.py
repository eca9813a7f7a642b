"""The absl command lines behind `trainers/*.py`: flags, validation and the four programs.

Bad names and conflicting flags stop at parsing with absl's one-line usage error (exit code 1)
that lists the valid choices.
"""

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from keras_mixer.models import MODEL_NAMES
from keras_mixer.training.config import PRECISIONS, STRATEGIES, XLA

FLAGS = flags.FLAGS
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "trainers", "configs")


def _dataset_ok(value):
    """digits, folder:PATH with an existing folder, or a registered TFDS name."""
    if value is None or value == "digits":
        return True
    if value.startswith("folder:"):
        return os.path.isdir(value[len("folder:") :])
    import tensorflow_datasets as tfds

    return value.split(":")[0].split("/")[0] in tfds.list_builders()


def _common_flags(recipe):
    flags.DEFINE_string("config", recipe, "Recipe name (trainers/configs/NAME.py) or path; flags override its fields.")
    flags.DEFINE_string("model", None, f"Mixer variant: {', '.join(MODEL_NAMES)}.")
    flags.DEFINE_string("dataset", None, "A TFDS name (imagenet2012, cifar10, ...), folder:PATH or digits.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory.")
    flags.DEFINE_boolean("download", None, "Download and prepare a TFDS data set if needed.")
    flags.DEFINE_integer("image_size", None, "Square input size in pixels.")
    flags.DEFINE_integer("batch_size", None, "Global batch size (all replicas).")
    flags.DEFINE_float("epochs", None, "Training length in epochs.")
    flags.DEFINE_integer("steps", None, "Training length in steps.")
    flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs, metrics.json and the export go here.")
    flags.DEFINE_integer("seed", None, "Seed for initialisation, data order and augmentation (deterministic ops).")
    flags.DEFINE_string("tpu", None, "TPU name or address; bare --tpu means the local TPU VM.")
    flags.DEFINE_enum("strategy", None, list(STRATEGIES), "tf.distribute strategy; auto picks from the machine.")
    flags.DEFINE_enum("mixed_precision", None, [*PRECISIONS, "none"], "Mixed precision compute dtype.")
    flags.DEFINE_enum("xla", None, list(XLA), "XLA for forward/backward (auto: on except TPU).")
    flags.DEFINE_float("learning_rate", None, "Peak learning rate.")
    flags.DEFINE_integer("warmup_steps", None, "Linear warmup steps.")
    flags.DEFINE_float("weight_decay", None, "Decoupled weight decay (AdamW).")
    flags.DEFINE_float("randaugment", None, "RandAugment magnitude m (2 ops).")
    flags.DEFINE_float("mixup", None, "Mixup Beta alpha.")
    flags.DEFINE_float("drop_path", None, "Stochastic depth rate of the last block.")
    flags.DEFINE_float("dropout", None, "Dropout inside the MLPs.")
    flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints.")
    flags.DEFINE_integer("log_every", None, "Steps between TensorBoard points.")
    flags.DEFINE_integer("eval_every", None, "Steps between evaluations (0: only at the end).")
    flags.DEFINE_integer("steps_per_loop", None, "Steps per host call (raise on TPUs).")
    flags.DEFINE_boolean("write_worker_weights", None, "Every worker writes its final weights (diagnostics).")
    flags.mark_flags_as_mutual_exclusive(["epochs", "steps"])
    flags.register_validator(
        "model", lambda v: v is None or v in MODEL_NAMES, message=f"unknown model; valid: {', '.join(MODEL_NAMES)}"
    )
    flags.register_validator(
        "dataset",
        _dataset_ok,
        message="unknown data set; valid: digits, folder:PATH (an existing folder) or a TFDS name from tfds.list_builders()",
    )
    flags.register_multi_flags_validator(
        ["tpu", "strategy"],
        lambda f: f["tpu"] is None or f["strategy"] in (None, "auto", "tpu"),
        message="--tpu conflicts with --strategy other than auto or tpu",
    )


def _quiet_logs():
    """TensorFlow's INFO chatter off; keras_mixer's own INFO lines (resume, XLA, expansion) kept."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("keras_mixer").setLevel(logging.INFO)


def _normalise_argv(argv):
    """A bare `--tpu` (last, or followed by another flag) means the local TPU VM."""
    out = []
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        out.append("--tpu=local" if arg == "--tpu" and (following is None or following.startswith("-")) else arg)
    return out


def _overrides(extra=()):
    names = [
        "model", "dataset", "data_dir", "download", "image_size", "batch_size", "epochs", "steps", "workdir",
        "seed", "tpu", "strategy", "xla", "learning_rate", "warmup_steps", "weight_decay", "randaugment",
        "mixup", "drop_path", "dropout", "checkpoint_every", "log_every", "eval_every", "steps_per_loop",
        "write_worker_weights", *extra,
    ]  # fmt: skip
    values = {name: FLAGS[name].value for name in names}
    if FLAGS.mixed_precision is not None:
        values["mixed_precision"] = None if FLAGS.mixed_precision == "none" else FLAGS.mixed_precision
    return values


def _train_main(extra=(), mode="pretrain"):
    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        _quiet_logs()
        from keras_mixer.training.config import load_config
        from keras_mixer.training.loop import TrainingDiverged, train

        try:
            config = load_config(FLAGS.config, CONFIGS_DIR, mode=mode, **_overrides(extra)).validate()
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        print(f"Training {config.model or config.init} on {config.dataset}; workdir {os.path.abspath(config.workdir)}")
        try:
            train(config)
        except TrainingDiverged as e:
            sys.exit(f"error: {e}")

    return main


def run_pretrain():
    _common_flags("demo")
    app.run(_train_main(), argv=_normalise_argv(sys.argv))


def run_finetune():
    _common_flags("finetune_demo")
    flags.DEFINE_string("init", None, "Weights to start from: .keras, official .npz, timm file, or a preset name.")
    app.run(_train_main(extra=("init",), mode="finetune"), argv=_normalise_argv(sys.argv))


# --- evaluate and export ----------------------------------------------------------------------------


def _source_flags():
    flags.DEFINE_string("source", None, "A SavedModel (or export base), a .keras file, a workdir or a checkpoint.")
    flags.mark_flag_as_required("source")


def run_evaluate():
    _source_flags()
    flags.DEFINE_string("dataset", None, "Data set (default: the workdir's).")
    flags.DEFINE_string("data_dir", None, "TFDS data directory.")
    flags.DEFINE_string("split", None, "Split (default: validation if it exists, else test).")
    flags.DEFINE_integer("batch_size", 256, "Batch size.")
    flags.DEFINE_enum("eval_resize", None, ["crop", "resize"], "Resize then centre-crop, or plain resize (default: the run's, else crop).")
    flags.DEFINE_float("crop_ratio", None, "Centre-crop ratio (default: the run's, else 0.875).")
    flags.register_validator("dataset", _dataset_ok, message="unknown data set; valid: digits, folder:PATH or a TFDS name")

    def main(argv):
        del argv
        _quiet_logs()
        from keras_mixer import data
        from keras_mixer.training.inference import load_predictor
        from keras_mixer.training.loop import make_evaluator

        import tensorflow as tf

        try:
            predictor = load_predictor(FLAGS.source)
            dataset = FLAGS.dataset or predictor.dataset
            if dataset is None:
                raise ValueError(f"give --dataset: {FLAGS.source!r} does not say what it was trained on")
            split = FLAGS.split or data.eval_split(dataset, FLAGS.data_dir)
            source = data.load_source(dataset, split, data_dir=FLAGS.data_dir, class_names=predictor.class_names)
        except (ValueError, FileNotFoundError) as e:
            raise app.UsageError(str(e)) from None
        evaluate = make_evaluator(
            tf.distribute.get_strategy(), predictor.predict, source, FLAGS.batch_size, predictor.image_size,
            FLAGS.eval_resize or predictor.eval_resize, FLAGS.crop_ratio or predictor.crop_ratio,
        )
        top1, top5 = evaluate()
        print(f"top-1: {top1:.4f}  top-5: {top5:.4f}  ({source.num_examples} images of {dataset}/{split}, {FLAGS.source})")

    app.run(main)


def run_export():
    _source_flags()
    flags.DEFINE_string("export_base", None, "TF Serving model base path; the version folder goes inside.")
    flags.DEFINE_integer("version", None, "Version number (default: next free).")
    flags.DEFINE_string("class_names", None, "Text file with one class name per line, in label order.")
    flags.DEFINE_string("model", None, "Variant, for a preset --source (e.g. B/16).")
    flags.DEFINE_integer("image_size", None, "Input size, for a preset --source (default 224).")
    flags.DEFINE_string("onnx", None, "Also write an ONNX file here.")
    flags.mark_flag_as_required("export_base")
    flags.register_validator(
        "model", lambda v: v is None or v in MODEL_NAMES, message=f"unknown model; valid: {', '.join(MODEL_NAMES)}"
    )

    def main(argv):
        del argv
        _quiet_logs()
        from keras_mixer.export import export_onnx, export_saved_model
        from keras_mixer.training.inference import load_keras_model

        try:
            model, class_names = load_keras_model(FLAGS.source, FLAGS.model, FLAGS.image_size)
            if FLAGS.class_names:
                with open(FLAGS.class_names) as f:
                    class_names = [line.strip() for line in f if line.strip()]
            path = export_saved_model(model, FLAGS.export_base, version=FLAGS.version, class_names=class_names)
            if FLAGS.onnx:
                export_onnx(model, FLAGS.onnx)
        except (ValueError, FileNotFoundError) as e:
            raise app.UsageError(str(e)) from None
        print(f"Exported {FLAGS.source} to {path}" + (f" and {FLAGS.onnx}" if FLAGS.onnx else ""))

    app.run(main)
