"""`trainers/study_permutation.py`: the permutation study of paper section 3.4 (Fig. 4).

    python trainers/study_permutation.py                      # digits at 16 px, Mixer T/4 vs ResNet-10
    python trainers/study_permutation.py --steps 100 --workdir /tmp/study

Writes WORKDIR/permutation.json (top-1 per model x order, the curves) after every finished cell
and WORKDIR/permutation.png at the end, and prints the table. A rerun with the same workdir and
recipe continues with the cells not yet done. The user's errors end with one `error: ...` line and
exit code 1, as in the training commands.
"""

import os

from absl import flags

from keras_mixer.training.cli import dataset_ok, define_model_flag, flag_overrides, run_program, user_errors

FLAGS = flags.FLAGS


def _define():
    flags.DEFINE_string("config", "permutation_study", "Recipe (name or .py path); the flags below override it.")
    define_model_flag()
    flags.DEFINE_string("dataset", None, "A TFDS name, folder:PATH or digits.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory.")
    flags.DEFINE_boolean("download", None, "Download and prepare a TFDS data set if needed.")
    flags.DEFINE_integer("image_size", None, "Square input size in pixels.", lower_bound=1)
    flags.DEFINE_integer("batch_size", None, "Batch size.", lower_bound=1)
    flags.DEFINE_float("epochs", None, "Training length of every cell in epochs.")
    flags.DEFINE_integer("steps", None, "Training length of every cell in steps.", lower_bound=1)
    flags.DEFINE_float("learning_rate", None, "Peak learning rate.")
    flags.DEFINE_integer("seed", None, "Seed of the initial weights, the batches and the permutations.")
    flags.DEFINE_string("workdir", "workdir/permutation", "permutation.json and permutation.png go here.")
    flags.DEFINE_integer("eval_every", 0, "Steps between points of the curves (0: about 20 points).", lower_bound=0)
    flags.DEFINE_list("orders", "original,patches,pixels", "Input orders to train on (these three).")
    flags.DEFINE_list("models", "mixer,resnet", "Models to train (these two).")
    flags.DEFINE_list("resnet_widths", ["16", "32"], "Channel widths of the ResNet's stages.")
    flags.DEFINE_enum("xla", None, ["auto", "on", "off"], "XLA for forward/backward.")
    flags.DEFINE_string("tpu", None, "TPU name or address; bare --tpu means the local TPU VM.")
    flags.DEFINE_enum("strategy", None, ["auto", "default", "mirrored", "tpu"], "tf.distribute strategy (one machine).")
    flags.DEFINE_enum("mixed_precision", None, ["bfloat16", "float16", "none"], "Mixed precision compute dtype.")
    flags.DEFINE_boolean(
        "restart", False, "Start again although --workdir holds a study (its files move to WORKDIR/previous/)."
    )
    flags.mark_flags_as_mutual_exclusive(["epochs", "steps"])
    flags.register_validator(
        "dataset",
        dataset_ok,
        message="unknown data set; valid: digits, folder:PATH (an existing folder) or a TFDS name",
    )


def _choices(flag, valid):
    values = tuple(dict.fromkeys(v.strip() for v in FLAGS[flag].value))
    unknown = [v for v in values if v not in valid]
    if unknown or not values:
        raise ValueError(f"--{flag} {','.join(FLAGS[flag].value)!r}: expected a comma list of {', '.join(valid)}")
    return tuple(v for v in valid if v in values)  # the table's order


def _widths():
    try:
        widths = tuple(int(w) for w in FLAGS.resnet_widths)
    except ValueError:
        widths = ()
    if not widths or min(widths) <= 0:
        raise ValueError(f"--resnet_widths {','.join(FLAGS.resnet_widths)!r}: expected positive integers such as 16,32")
    return widths


def run():
    def main():
        import tensorflow as tf

        from keras_mixer.studies import permutation
        from keras_mixer.training.config import load_config
        from keras_mixer.training.strategy import choose_strategy, make_strategy
        from keras_mixer.training.workdir import WorkdirLock, check_workdir, move_to_previous

        names = [
            "model",
            "dataset",
            "data_dir",
            "download",
            "image_size",
            "batch_size",
            "epochs",
            "steps",
            "learning_rate",
            "seed",
            "xla",
            "tpu",
            "strategy",
        ]
        with user_errors():
            config = load_config(FLAGS.config, workdir=FLAGS.workdir, **flag_overrides(names)).validate()
            if config.seed is None:
                config.seed = 0  # the study compares runs: they must share initial weights and batches
            study = permutation.Study(
                config,
                orders=_choices("orders", permutation.ORDERS),
                models=_choices("models", permutation.MODELS),
                resnet_widths=_widths(),
                eval_every=FLAGS.eval_every,
            )
            gpus = len(tf.config.list_physical_devices("GPU"))
            kind = choose_strategy(config.strategy, config.tpu, None, gpus)  # one machine: TF_CONFIG is not read
            strategy = make_strategy(kind, config.tpu)
            check_workdir(FLAGS.workdir)
            with WorkdirLock(FLAGS.workdir):
                if FLAGS.restart and (moved := move_to_previous(FLAGS.workdir)):
                    print(f"--restart: the earlier study's files were moved to {moved}")
                tf.config.experimental.enable_op_determinism()
                results = permutation.run(study, FLAGS.workdir, strategy)
        print(permutation.table(results))
        folder = os.path.abspath(FLAGS.workdir)
        print(
            f"Eval top-1 (%) on {results['dataset']}/{results['eval_split']}, {results['total_steps']} steps each. "
            f"Wrote {os.path.join(folder, permutation.RESULTS)} and {os.path.join(folder, permutation.PICTURE)}"
        )

    run_program(_define, main)
