"""The absl command lines behind `trainers/*.py`: flags, validation and the four programs.

Bad names and conflicting flags stop at parsing with absl's one-line usage error (exit code 1)
that lists the valid choices. Errors found later that are the user's or the machine's to fix (a
bad value, a missing or corrupt file, a busy workdir, a changed recipe, a full disk) end with one
`error: ...` line and exit code 1; `--debug` shows their traceback too. Any other exception is a
bug and keeps its traceback.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import sys
import typing

from absl import app, flags
from absl import logging as absl_logging

from keras_mixer.model.precisions import SERVING
from keras_mixer.model.variants import MODEL_NAMES
from keras_mixer.programs import tensorflow_start
from keras_mixer.training.config import FLAG_FIELDS, TrainConfig, accepts_none, parse_shots, recipe_names

FLAGS = flags.FLAGS


def _error_line(error):
    """The one line for a user's or the machine's error, or None for a bug."""
    from keras_mixer.training.checkpoint_store import NoCheckpointRestores
    from keras_mixer.training.stops import TrainingDiverged, TrainingStopped

    ours = [NoCheckpointRestores, TrainingDiverged, TrainingStopped]
    # TensorFlow's file errors (a missing, unreadable or corrupt file) are the user's to fix too.
    # Only a TensorFlow that is loaded can have raised one: the command line is checked before
    # TensorFlow is imported, and telling its errors apart must not import it.
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        ours += [tf.errors.NotFoundError, tf.errors.DataLossError, tf.errors.PermissionDeniedError]

    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", " ".join(str(error).split()))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text:
        where = f" while writing {error.filename!r}" if getattr(error, "filename", None) else ""
        return (
            f"the disk is full{where} ({text[:200]}). Free some space, then rerun the same command: a training "
            f"run resumes from its last complete checkpoint, and no finished file was left half-written."
        )
    if getattr(error, "hard_exit", False):  # a multi-worker stop: preemption or a lost worker
        return text
    if isinstance(error, (ValueError, OSError, *ours)):
        return text
    return None


@contextlib.contextmanager
def user_errors():
    """Turns a user's or the machine's error into one `error: ...` line and exit code 1."""
    try:
        yield
    except Exception as e:
        line = _error_line(e)
        if line is None or FLAGS.debug:
            raise
        sys.stdout.flush()
        prefix = "stopped" if hasattr(e, "signum") else "error"
        text = f"\n{prefix}: {line}\n"  # on a line of its own after a progress bar
        real = getattr(e, "stderr_fd", None)
        if getattr(e, "hard_exit", False) or real is not None:
            # Leave at once (files and the workdir lock were closed on the way here): a run over
            # several machines that lost one or stopped, whose cluster would wait for the others
            # at shutdown; or a failed orbax save, which muted standard error for its pending
            # writes' reports, which can come until the process ends: the line goes to the real one.
            sys.stderr.flush()
            os.write(real if real is not None else sys.stderr.fileno(), text.encode())
            os._exit(128 + e.signum if hasattr(e, "signum") else 1)
        print(text, end="", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum if hasattr(e, "signum") else 1)  # 143 after SIGTERM, as a shell reports it


def program_flags(define):
    """Runs `define()` (flag definitions) and lists the new flags as the program's own, so `--help`
    and `--helpshort` show them (absl shows only the main module's key flags there)."""
    before = set(FLAGS)
    define()
    flags.DEFINE_boolean("debug", False, "Show the traceback of errors that are reported as one line.")
    flags.DEFINE_boolean(
        "verbose",
        False,
        "Show TensorFlow's start-up and INFO log lines (also KERAS_MIXER_VERBOSE=1); read before the flags are "
        "parsed (keras_mixer.programs).",
    )
    for name in sorted(set(FLAGS) - before):
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


def dataset_ok(value):
    """digits, folder:PATH with an existing folder, or a registered TFDS name."""
    if value is None or value == "digits":
        return True
    if value.startswith("folder:"):
        return os.path.isdir(value[len("folder:") :])
    import tensorflow_datasets as tfds

    return value.split(":")[0].split("/")[0] in tfds.list_builders()


def define_model_flag(description=f"Mixer variant: {', '.join(MODEL_NAMES)}.", flag_values=FLAGS):
    """--model, refused at parsing unless a variant name (`keras_mixer.model.variants`)."""
    flags.DEFINE_string("model", None, description, flag_values=flag_values)
    flags.register_validator(
        "model",
        lambda v: v is None or v in MODEL_NAMES,
        message=f"unknown model; valid: {', '.join(MODEL_NAMES)}",
        flag_values=flag_values,
    )


# For programs whose --source may be a release name ("imagenet21k") that needs a variant.
SOURCE_MODEL_HELP = "Variant, for a release name as --source (imagenet21k with B/16)."


def define_field_flags(names, help=None, flag_values=FLAGS):
    """absl flags for the `TrainConfig` fields `names`, from its table: the field's type and help
    (`help` may replace some: {name: text}), an enum for a field with choices (plus "none" where it
    may be None: it clears the recipe's value), a comma list for a tuple. Every default is None,
    so a flag not given leaves the recipe's value."""
    help = help or {}
    for field in dataclasses.fields(TrainConfig):
        if field.name not in names:
            continue
        name, text, choices = field.name, help.get(field.name, field.metadata["help"]), field.metadata["choices"]
        kind = next(t for t in typing.get_args(field.type) or (field.type,) if t is not type(None))
        if name == "model":
            define_model_flag(text, flag_values)
        elif choices:
            valid = [*choices, *(["none"] if accepts_none(field) else [])]
            flags.DEFINE_enum(name, None, valid, text, flag_values=flag_values)
        else:  # a str, and a tuple as its comma list, is a string flag
            define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float}
            define.get(kind, flags.DEFINE_string)(name, None, text, flag_values=flag_values)


def register_data_validators():
    """--dataset must name a data set, and --tpu goes with the TPU strategy only."""
    flags.register_validator(
        "dataset",
        dataset_ok,
        message="unknown data set; valid: digits, folder:PATH (an existing folder) "
        "or a TFDS name from tfds.list_builders()",
    )
    flags.register_multi_flags_validator(
        ["tpu", "strategy"],
        lambda f: f["tpu"] is None or f["strategy"] in (None, "auto", "tpu"),
        message="--tpu conflicts with --strategy other than auto or tpu",
    )


def _common_flags(recipe):
    flags.DEFINE_string(
        "config", recipe, f"Recipe: {', '.join(recipe_names())}, or a path to a .py file; flags override its fields."
    )
    define_field_flags(FLAG_FIELDS)
    flags.DEFINE_boolean(
        "restart",
        False,
        "Start again from step 0 although --workdir holds a run (its files move to WORKDIR/previous/).",
    )
    flags.DEFINE_list(
        "accept_changes", [], "Recipe fields a resumed run may change (comma list, or 'all'); recorded in run.json."
    )
    flags.mark_flags_as_mutual_exclusive(["epochs", "steps"])
    register_data_validators()


def quiet_logs():
    """TensorFlow's INFO chatter off (unless --verbose); keras_mixer's own INFO lines (resume, XLA,
    expansion) kept."""
    absl_logging.set_verbosity(absl_logging.INFO if FLAGS.verbose else absl_logging.WARNING)
    logging.getLogger("keras_mixer").setLevel(logging.INFO)


def run_program(define, body, takes_paths=False, check=None):
    """Every program's start: defines its flags (`define`), parses the command line, runs
    `check()` where given (the checks that need no TensorFlow), imports TensorFlow with its
    start-up lines left out (`tensorflow_start`) and runs `body()` (`body(paths)` for a program
    that `takes_paths`; the others refuse a positional argument with absl's one-line usage error,
    exit code 1). So a bad flag is refused before the seconds TensorFlow's import takes.
    TensorFlow's INFO logs are quieted; a bare `--tpu` means the local TPU VM."""
    program_flags(define)

    def main(argv):
        if len(argv) > 1 and not takes_paths:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        quiet_logs()
        if check is not None:
            check()
        tensorflow_start.quiet_import()
        body(argv[1:]) if takes_paths else body()

    app.run(main, argv=normalise_argv(sys.argv))


def normalise_argv(argv):
    """A bare `--tpu` (last, or followed by another flag) means the local TPU VM."""
    out = []
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        out.append("--tpu=local" if arg == "--tpu" and (following is None or following.startswith("-")) else arg)
    return out


def flag_overrides(names, flag_values=FLAGS):
    """{TrainConfig field: value} for the flags of `names` that were given (the recipe's value
    stands for the others): "none" clears a field that may be None, a comma list becomes a tuple."""
    values = {}
    for name in names:
        value, field = flag_values[name].value, TrainConfig.__dataclass_fields__[name]
        if value is None:
            continue
        if value == "none" and field.metadata["choices"] and accepts_none(field):
            value = None
        elif field.type is tuple:
            value = parse_shots(value, f"--{name}")
        values[name] = value
    return values


def _training(extra=(), mode="pretrain"):
    """(check, body) of a training program: `check` reads the recipe with the flags and checks it
    (no TensorFlow), `body` trains it."""
    checked = {}

    def check():
        from keras_mixer.training.config import load_config

        with user_errors():
            config = load_config(FLAGS.config, mode=mode, **flag_overrides((*FLAG_FIELDS, *extra))).validate()
            unknown = sorted(set(FLAGS.accept_changes) - set(TrainConfig.__dataclass_fields__) - {"all"})
            if unknown:
                raise ValueError(f"--accept_changes names unknown fields {unknown}; valid: recipe field names or 'all'")
        checked["config"] = config

    def body():
        from keras_mixer.training import train

        config = checked["config"]
        what = config.model or config.init or "a Mixer sized to the data"
        print(f"Training {what} on {config.dataset}; workdir {os.path.abspath(config.workdir)}")
        with user_errors():
            train(config, restart=FLAGS.restart, accept_changes=FLAGS.accept_changes)

    return check, body


def run_pretrain():
    check, body = _training()
    run_program(lambda: _common_flags("demo"), body, check=check)


def run_finetune():
    def define():
        _common_flags("finetune_demo")
        define_field_flags(["init"])

    check, body = _training(extra=("init",), mode="finetune")
    run_program(define, body, check=check)


# --- evaluate and export ----------------------------------------------------------------------------


def _source_flags():
    flags.DEFINE_string(
        "source",
        None,
        "A SavedModel (or export base), a .keras file, a workdir, a checkpoint, a preset, a weights file, a keras-hub "
        "preset folder, hf://org/name[@revision] or kaggle://owner/model/keras/variant[/version].",
    )
    flags.mark_flag_as_required("source")


def run_evaluate():
    def define():
        _source_flags()
        flags.DEFINE_string("dataset", None, "Data set (default: the one the source records).")
        flags.DEFINE_string("data_dir", None, "TFDS data directory.")
        flags.DEFINE_string("split", None, "Split (default: validation if it exists, else test).")
        flags.DEFINE_integer("batch_size", 256, "Batch size.", lower_bound=1)
        flags.DEFINE_enum(
            "eval_resize",
            None,
            ["crop", "resize"],
            "Resize then centre-crop, or plain resize (default: the run's, else crop).",
        )
        flags.DEFINE_float("crop_ratio", None, "Centre-crop ratio (default: the run's, else 0.875).")
        flags.register_validator(
            "dataset", dataset_ok, message="unknown data set; valid: digits, folder:PATH or a TFDS name"
        )

    def main():
        import keras

        from keras_mixer import data
        from keras_mixer.model.pixels import EvalPreprocessing

        with user_errors():
            on_jax = keras.backend.backend() == "jax"
            evaluator, image_size, trained_on = (_jax_evaluator if on_jax else _tf_evaluator)(FLAGS.source)
            dataset = FLAGS.dataset or trained_on.dataset
            if dataset is None:
                raise ValueError(f"give --dataset: {FLAGS.source!r} does not record what it was trained on")
            split = FLAGS.split or data.eval_split(dataset, FLAGS.data_dir)
            source = data.load_source(dataset, split, data_dir=FLAGS.data_dir, class_names=trained_on.class_names)
            recorded = trained_on.preprocessing
            preprocessing = EvalPreprocessing(
                FLAGS.eval_resize or recorded.eval_resize,
                FLAGS.crop_ratio or recorded.crop_ratio,
                recorded.interpolation,
            )
            top1, top5 = evaluator(source, FLAGS.batch_size, image_size, preprocessing)
        print(
            f"top-1: {top1:.4f}  top-5: {top5:.4f}  ({source.num_examples} images of {dataset}/{split}, {FLAGS.source})"
        )

    run_program(define, main)


def _tf_evaluator(source):
    """(evaluate(split, batch_size, image_size, preprocessing) -> (top-1, top-5), the model's input
    size, its `TrainedOn`) for any source, on Keras' TensorFlow backend."""
    import tensorflow as tf

    from keras_mixer.serving.trained_models import load_predictor
    from keras_mixer.training.tf.evaluation import make_evaluator

    predictor = load_predictor(source)

    def evaluate(split, batch_size, image_size, preprocessing):
        strategy = tf.distribute.get_strategy()
        return make_evaluator(strategy, predictor.predict, split, batch_size, image_size, preprocessing)()

    return evaluate, predictor.image_size, predictor.trained_on


def _jax_evaluator(source):
    """`_tf_evaluator` on Keras' JAX backend: a Keras source, data-parallel over every device."""
    import jax

    from keras_mixer.serving.trained_models import load_keras_model
    from keras_mixer.training.jax.evaluation import make_jax_evaluator
    from keras_mixer.training.jax.step import data_parallel
    from keras_mixer.weights_io import source_kinds

    found = source_kinds.resolve(source)
    if found.kind == "export":
        raise ValueError(
            f"{source!r} is a SavedModel, a TensorFlow graph: evaluate it with KERAS_BACKEND=tensorflow, or give the "
            f".keras file or workdir it was exported from"
        )
    place = data_parallel()  # before the model is built: its variables go to every device
    model, trained_on = load_keras_model(found)

    def evaluate(split, batch_size, image_size, preprocessing):
        if batch_size % jax.device_count():
            raise ValueError(f"--batch_size {batch_size} is not divisible by the {jax.device_count()} devices")
        evaluate_values = make_jax_evaluator(model, split, batch_size, image_size, preprocessing, place)
        values = ([v.value for v in vs] for vs in (model.trainable_variables, model.non_trainable_variables))
        return evaluate_values(*values)

    return evaluate, tuple(model.input_shape[1:3]), trained_on


def run_export():
    from keras_mixer.model.pixels import DEFAULT_MAX_PIXELS

    def define():
        _source_flags()
        flags.DEFINE_string("export_base", None, "TF Serving model base path; the version folder goes inside.")
        flags.DEFINE_integer("version", None, "Version number (default: next free).", lower_bound=1)
        flags.DEFINE_string(
            "class_names", None, "UTF-8 text file, one class name per line in label order (line 1: label 0)."
        )
        define_model_flag(SOURCE_MODEL_HELP)
        flags.DEFINE_integer(
            "image_size", None, "Input size, for a preset or weights file --source (default its own).", lower_bound=1
        )
        flags.DEFINE_integer(
            "max_pixels",
            DEFAULT_MAX_PIXELS,
            "The bytes signature refuses images with more pixels (width x height).",
            lower_bound=1,
        )
        flags.DEFINE_enum(
            "precision",
            "float32",
            list(SERVING),
            "float32, or bfloat16 (bf16 products, float32 statistics "
            "and logits): several times faster on serving CPUs with AMX or AVX512-BF16, slower on CPUs without them.",
        )
        flags.DEFINE_string("onnx", None, "Also write an ONNX file here.")
        flags.DEFINE_string(
            "preset_dir",
            None,
            "Also (or, without --export_base, only) write a keras-hub preset folder here (a new folder): "
            "the model, its weights and what it was trained on, for from_preset and the hubs.",
        )
        flags.register_multi_flags_validator(
            ["export_base", "preset_dir"],
            lambda values: values["export_base"] or values["preset_dir"],
            message="give --export_base (a TF Serving export), --preset_dir (a keras-hub preset folder) or both",
        )

    def main():
        import keras

        if keras.backend.backend() != "tensorflow":
            # A SavedModel is a TensorFlow graph: this program runs again on Keras' TensorFlow backend,
            # on the CPU (an export needs no accelerator).
            print(f"Exporting on Keras' tensorflow backend (this process has {keras.backend.backend()})", flush=True)
            sys.stdout.flush()
            env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
            os.execve(sys.executable, [sys.executable, *sys.argv], env)  # the same program, its own flags

        from keras_mixer.serving.export import export_onnx, export_saved_model
        from keras_mixer.serving.trained_models import load_keras_model

        with user_errors():
            model, trained_on = load_keras_model(FLAGS.source, FLAGS.model, FLAGS.image_size)
            class_names = read_class_names(FLAGS.class_names) if FLAGS.class_names else None
            written = []
            if FLAGS.preset_dir:  # first: a refused folder (not empty) stops before the slower export
                record = trained_on if class_names is None else trained_on.replace(class_names=tuple(class_names))
                model.save_to_preset(FLAGS.preset_dir, trained_on=record, top1=source_top1(FLAGS.source))
                written.append(f"{FLAGS.preset_dir} (keras-hub preset folder)")
            if FLAGS.export_base:
                path = export_saved_model(
                    model,
                    FLAGS.export_base,
                    version=FLAGS.version,
                    class_names=class_names,
                    max_pixels=FLAGS.max_pixels,
                    trained_on=trained_on,
                    precision=FLAGS.precision,
                )
                written.insert(0, f"{path} ({FLAGS.precision})")
            if FLAGS.onnx:
                export_onnx(model, FLAGS.onnx)
                written.append(FLAGS.onnx)
        print(f"Exported {FLAGS.source} to {' and '.join(written)}")

    run_program(define, main)


def source_top1(source):
    """The evaluation top-1 a finished workdir's metrics.json records, else None."""
    path = os.path.join(os.fspath(source), "metrics.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("eval_top1")
    except (OSError, ValueError):
        return None


# --- predict ------------------------------------------------------------------------------------------

# Exit code of a predict run that skipped a file (1 stays for errors that stop the run).
SKIPPED_EXIT = 2


def read_class_names(path):
    """The names in a --class_names file: UTF-8 text, one name per line in label order (line 1 is
    label 0), blank lines and surrounding spaces left out."""
    what = "a UTF-8 text file with one class name per line, in label order"
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"--class_names {path!r}: no such file (expected {what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--class_names {path!r}: cannot be read ({e}); expected {what}") from None
    if not names:
        raise ValueError(f"--class_names {path!r} holds no names (expected {what})")
    return names


def run_predict():
    def define():
        _source_flags()
        flags.DEFINE_integer("top_k", 5, "Labels per image (at most the class count).", lower_bound=1)
        flags.DEFINE_enum("format", "text", ["text", "csv", "json"], "text lines, CSV, or JSON lines.")
        flags.DEFINE_integer("batch_size", 64, "Images per batch.", lower_bound=1)

    def main(paths):
        from keras_mixer.serving import label_files

        if not paths:
            raise app.UsageError("give the image files or folders to label after the flags")
        with user_errors():
            labeller = label_files.open_labeller(FLAGS.source)
        files, missing = label_files.image_files(paths)
        for path in missing:
            print(f"skipped: {path}: no such file or folder", file=sys.stderr, flush=True)
        write = _writer(FLAGS.format)
        show = _progress(len(files)) if sys.stderr.isatty() and len(files) > FLAGS.batch_size else None
        skipped = len(missing)
        labelled = label_files.label_files(
            files, labeller.scores_of, labeller.decode, labeller.class_names, FLAGS.top_k, FLAGS.batch_size, show
        )
        for result in labelled:
            if result.error is None:
                write(result)
            else:
                skipped += 1
                print(f"{chr(13) if show else ''}skipped: {result.path}: {result.error}", file=sys.stderr, flush=True)
        if show:
            print(file=sys.stderr)
        if skipped:
            print(f"{skipped} of {len(files) + len(missing)} files skipped", file=sys.stderr)
            sys.exit(SKIPPED_EXIT)

    run_program(define, main, takes_paths=True)


def _writer(form):
    """A function that prints one `Labelled` on stdout in `form` (text, csv or json)."""
    import csv
    import json

    if form == "json":
        return lambda r: print(json.dumps(dict(path=r.path, top=[dict(label=name, score=p) for name, p in r.top])))
    if form == "csv":
        out = csv.writer(sys.stdout, lineterminator="\n")
        header = [False]

        def write_row(r):
            if not header[0]:
                k = len(r.top)
                out.writerow(["path", *(f"{kind}_{i + 1}" for i in range(k) for kind in ("label", "score"))])
                header[0] = True
            out.writerow([r.path, *(v for label, score in r.top for v in (label, f"{score:.6f}"))])

        return write_row
    return lambda r: print(r.path, "  ".join(f"{label} {score:.4f}" for label, score in r.top), sep="\t")


def _progress(total):
    """Progress on stderr (a terminal): images done of `total`, rewritten in place."""

    def show(done):
        print(f"\r{done}/{total} images", end="", file=sys.stderr, flush=True)

    return show
