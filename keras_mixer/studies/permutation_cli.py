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

from keras_mixer.programs.command_lines import (
    define_field_flags,
    flag_overrides,
    register_data_validators,
    run_program,
    user_errors,
)

FLAGS = flags.FLAGS


# The recipe fields the study takes as flags (the training programs' flags, with these helps).
FIELDS = {
    "model": None,
    "dataset": None,
    "data_dir": None,
    "download": None,
    "image_size": None,
    "batch_size": "Batch size.",
    "epochs": "Training length of every cell in epochs.",
    "steps": "Training length of every cell in steps.",
    "learning_rate": None,
    "seed": "Seed of the initial weights, the batches and the permutations (default 0).",
    "xla": None,
    "tpu": None,
    "strategy": "tf.distribute strategy on one machine (multi_worker is refused).",
    "mixed_precision": None,
}


def _define():
    flags.DEFINE_string("config", "permutation_study", "Recipe (name or .py path); the flags below override it.")
    define_field_flags(FIELDS, help={k: v for k, v in FIELDS.items() if v})
    flags.DEFINE_string("workdir", "workdir/permutation", "permutation.json and permutation.png go here.")
    flags.DEFINE_integer("eval_every", 0, "Steps between points of the curves (0: about 20 points).", lower_bound=0)
    flags.DEFINE_list("orders", "original,patches,pixels", "Input orders to train on (these three).")
    flags.DEFINE_list("models", "mixer,resnet", "Models to train (these two).")
    flags.DEFINE_list("resnet_widths", ["16", "32"], "Channel widths of the ResNet's stages.")
    flags.DEFINE_boolean(
        "restart", False, "Start again although --workdir holds a study (its files move to WORKDIR/previous/)."
    )
    flags.mark_flags_as_mutual_exclusive(["epochs", "steps"])
    register_data_validators()


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


def _check_backend():
    """The study's cells train with the TF trainer's step on a tf.distribute strategy; on another
    Keras backend it is refused before anything is read or written."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"the permutation study trains on Keras' tensorflow backend only, and this process has "
            f"KERAS_BACKEND={backend}: rerun it with KERAS_BACKEND=tensorflow (the trainers themselves run on jax)"
        )


def run():
    def main():
        import tensorflow as tf

        from keras_mixer.studies import permutation
        from keras_mixer.training.config import load_config
        from keras_mixer.training.tf.strategy import choose_strategy, make_strategy
        from keras_mixer.training.workdir import WorkdirLock, check_workdir, move_to_previous

        with user_errors():
            _check_backend()
            config = load_config(FLAGS.config, workdir=FLAGS.workdir, **flag_overrides(FIELDS)).validate()
            if config.strategy == "multi_worker":
                raise ValueError("the permutation study runs on one machine: --strategy multi_worker is not supported")
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
