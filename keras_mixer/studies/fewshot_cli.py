"""`trainers/fewshot.py` (`keras-mixer-fewshot`): linear few-shot accuracy of a model's frozen
pre-logit features, k shots per class from the train split, top-1 on the evaluation split.

    python trainers/fewshot.py --source workdir/demo --shots 1,5,10,25 --draws 5

Writes OUT/fewshot.json (every draw's accuracy, mean, std, min, max per k, and the setup) and
OUT/fewshot.png (accuracy against shots), and prints a table. The probe is defined in
`keras_mixer.training.fewshot`.
"""

import os

from absl import flags

from keras_mixer.programs.command_lines import run_program, user_errors
from keras_mixer.training.fewshot import L2, SHOTS

FLAGS = flags.FLAGS


def _define():
    flags.DEFINE_string(
        "source", None, "A .keras file, a training workdir, a checkpoint, a preset name or a weights file."
    )
    flags.DEFINE_string("dataset", None, "Data set (default: the one the source records, else digits).")
    flags.DEFINE_string("data_dir", None, "TFDS data directory.")
    flags.DEFINE_string("shots", ",".join(map(str, SHOTS)), "Shots per class, a comma list of positive integers.")
    flags.DEFINE_integer("draws", 5, "Random draws of the shots per k.", lower_bound=1)
    flags.DEFINE_float("l2", L2, "Ridge penalty of the probe (big_vision's default 2^10 on standardised features).")
    flags.DEFINE_integer("seed", 0, "Seed of the draws.")
    flags.DEFINE_integer("batch_size", 256, "Batch size of the feature extraction.", lower_bound=1)
    flags.DEFINE_string("out", "fewshot", "Folder for fewshot.json and fewshot.png (made if missing).")
    flags.mark_flag_as_required("source")


def plot(results, num_classes, title):
    """A `matplotlib.figure.Figure`: mean accuracy against shots, the min-max band over the draws,
    std error bars and the chance level."""
    from matplotlib.figure import Figure

    shots = sorted(results)
    mean = [results[k]["mean"] for k in shots]
    figure = Figure(figsize=(5.5, 4), dpi=120)
    ax = figure.add_subplot()
    ax.fill_between(
        shots,
        [results[k]["min"] for k in shots],
        [results[k]["max"] for k in shots],
        alpha=0.25,
        label="min-max of the draws",
    )
    ax.errorbar(shots, mean, yerr=[results[k]["std"] for k in shots], marker="o", capsize=3, label="mean ± std")
    ax.axhline(1.0 / num_classes, color="grey", linestyle="--", label=f"chance ({1 / num_classes:.3g})")
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_ylim(0, 1)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    figure.tight_layout()
    return figure


def main():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from keras_mixer import data
    from keras_mixer.atomic_files import atomic_write, write_json
    from keras_mixer.serving.trained_models import load_keras_model
    from keras_mixer.training import fewshot as probe

    with user_errors():
        shots = probe.parse_shots(FLAGS.shots, "--shots")
        if not FLAGS.l2 > 0:
            raise ValueError(f"--l2 must be positive, got {FLAGS.l2}")
        model, trained_on = load_keras_model(FLAGS.source)
        dataset = FLAGS.dataset or trained_on.dataset or "digits"
        # The model's class names do not constrain the probe: it may run on another data set.
        train = data.load_source(dataset, "train", data_dir=FLAGS.data_dir)
        split = data.eval_split(dataset, FLAGS.data_dir)
        test = data.load_source(dataset, split, data_dir=FLAGS.data_dir, class_names=train.class_names)
        preprocessing = trained_on.preprocessing
        image_size = tuple(model.input_shape[1:3])
        # Draws the shots (a k the data cannot give fails here, before any feature is computed).
        fewshot = probe.FewshotProbe(
            train, test, shots, image_size, preprocessing, FLAGS.batch_size, FLAGS.draws, FLAGS.seed, FLAGS.l2
        )
        results = fewshot(probe.features_function(model), verbose=1)

        os.makedirs(FLAGS.out, exist_ok=True)
        json_path = os.path.join(FLAGS.out, "fewshot.json")
        picture_path = os.path.join(FLAGS.out, "fewshot.png")
        write_json(
            json_path,
            dict(
                source=FLAGS.source,
                dataset=dataset,
                train_split="train",
                eval_split=split,
                train_examples=train.num_examples,
                drawn_train_examples=len(fewshot.train_labels),
                eval_examples=test.num_examples,
                num_classes=train.num_classes,
                chance=1.0 / train.num_classes,
                feature_dim=fewshot.feature_dim,
                image_size=list(image_size),
                preprocessing=preprocessing.to_dict(),
                l2=FLAGS.l2,
                seed=FLAGS.seed,
                draws=FLAGS.draws,
                shots=list(shots),
                results={str(k): r for k, r in results.items()},
            ),
        )
        name = os.path.basename(os.path.normpath(FLAGS.source))
        title = f"{name} on {dataset}: linear few-shot, {fewshot.feature_dim}-d pre-logits, {FLAGS.draws} draws"
        figure = plot(results, train.num_classes, title)
        FigureCanvasAgg(figure)  # renders without pyplot's global state
        atomic_write(picture_path, lambda f: figure.savefig(f, format="png"))

    chance = 1 / train.num_classes
    print(f"\nLinear few-shot top-1 on {dataset}/{split} ({test.num_examples} images; chance {chance:.3f}), ", end="")
    print(f"{FLAGS.draws} draws, l2 {FLAGS.l2:g}:")
    print(f"{'k':>4}  {'mean ± std':>16}  {'min':>6}  {'max':>6}")
    for k, r in results.items():
        print(f"{k:>4}  {r['mean']:>7.4f} ± {r['std']:.4f}  {r['min']:.4f}  {r['max']:.4f}")
    print(f"Wrote {json_path} and {picture_path}")


def run():
    run_program(_define, main)
