"""The paper's permutation study (section 3.4, Fig. 4): a Mixer and a CNN trained on the same data
in three input orders.

    original  the images as they are
    patches   one fixed shuffle of the patches plus one fixed pixel permutation shared by all
              patches: to a Mixer a relabelling of its weights (`relabel_weights`), so it learns
              exactly as well; a CNN loses the images' local structure between patches
    pixels    one fixed permutation of all pixel positions: both lose locality; the Mixer less

Every (model, order) cell trains with the same recipe, seed and number of steps: the same initial
weights per model, the same batches and augmentation (the permutation is applied after it). The
results go to WORKDIR/permutation.json after each finished cell, so a killed study loses at most
the cell it was in and a rerun continues; WORKDIR/permutation.png draws the curves.
"""

import dataclasses
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from keras_mixer import data
from keras_mixer.atomic_files import atomic_write, read_json, write_json
from keras_mixer.model.mixer import MlpMixer, variant_config
from keras_mixer.studies.resnet import resnet_name, small_resnet
from keras_mixer.training.config import OPERATIONAL_FIELDS, run_length
from keras_mixer.training.optimizer import make_optimizer, set_mixed_precision
from keras_mixer.training.stops import TrainingDiverged
from keras_mixer.training.tf.engine import recipe_stream
from keras_mixer.training.tf.evaluation import make_evaluator
from keras_mixer.training.tf.step import decide_xla, make_train_steps
from keras_mixer.weights_io import loader

ORDERS = ("original", "patches", "pixels")
MODELS = ("mixer", "resnet")
RESULTS = "permutation.json"
PICTURE = "permutation.png"


def make_permutation(order, image_size, patch_size, seed):
    """The fixed `data.ImagePermutation` of `order` ("original": None)."""
    if order not in ORDERS:
        raise ValueError(f"unknown input order {order!r}; valid: {', '.join(ORDERS)}")
    if order == "original":
        return None
    return data.ImagePermutation(order, image_size, patch_size if order == "patches" else None, seed)


def relabel_weights(model, permutation):
    """Sets a Mixer's weights to those that act on `permutation`-ed images exactly as the current
    ones act on the original images (a "patches" permutation only).

    Patch j of a permuted image is patch patch_order[j] of the original with its pixels reordered
    by pixel_order, so the stem kernel [Ph, Pw, channels, C] takes the same pixel order (every
    token embedding stays the same) and the token-mixing MLPs take the patch order on their token
    axis: Dense_0 kernel [S, D_S] by rows, Dense_1 kernel [D_S, S] and bias [S] by columns. The
    tokens are then the original ones in permuted order, which the average pool forgets.
    """
    if permutation.kind != "patches":
        raise ValueError(f"only the 'patches' permutation is a relabelling of a Mixer, not {permutation.kind!r}")
    patch_order, pixel_order = data.permutations.patch_shuffle(
        permutation.image_size, permutation.patch_size, permutation.seed
    )
    stem = model.get_layer("stem")
    kernel = stem.kernel.numpy()
    flat = kernel.reshape(-1, *kernel.shape[2:])  # [Ph * Pw, channels, C], row-major like pixel_order
    stem.kernel.assign(flat[pixel_order].reshape(kernel.shape))
    for i in range(model.num_blocks):
        mlp = model.get_layer(f"MixerBlock_{i}").token_mixing
        mlp.dense_0.kernel.assign(mlp.dense_0.kernel.numpy()[patch_order])
        mlp.dense_1.kernel.assign(mlp.dense_1.kernel.numpy()[:, patch_order])
        mlp.dense_1.bias.assign(mlp.dense_1.bias.numpy()[patch_order])
    return model


@dataclasses.dataclass
class Study:
    """What the study trains: a `TrainConfig` recipe (seed set) and the study's own choices."""

    config: object  # keras_mixer.training.TrainConfig
    orders: tuple = ORDERS
    models: tuple = MODELS
    resnet_widths: tuple = (16, 32)
    eval_every: int = 0  # steps between points of the curves; 0: about 20 points

    def recipe(self):
        """Everything that decides the numbers (what a rerun must match to continue)."""
        config = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in OPERATIONAL_FIELDS}
        return dict(config=config, resnet_widths=list(self.resnet_widths), eval_every=self.eval_every)

    def model_names(self):
        return dict(mixer=f"Mixer {self.config.model}", resnet=resnet_name(self.resnet_widths))


def build(kind, study, num_classes):
    """A freshly initialised model of `kind`, the same weights every time for the study's seed."""
    config = study.config
    keras.utils.set_random_seed(config.seed)
    shape = (config.image_size, config.image_size, 3)
    if kind == "mixer":
        return loader.create(
            MlpMixer,
            config.model,
            input_shape=shape,
            classes=num_classes,
            classifier_activation=None,
            dropout_rate=config.dropout,
            drop_path_rate=config.drop_path,
            seed=config.seed,
        )
    return small_resnet(shape, num_classes, widths=study.resnet_widths)


def train_cell(
    model, config, train_source, eval_source, permutation=None, eval_every=None, progress=None, strategy=None
):
    """Trains `model` (logits out, built in `strategy`'s scope) with `config`'s recipe on
    `permutation`-ed images, on `strategy` (default: the current one).

    Returns the curve [dict(step, train_loss, eval_top1)] with a point every `eval_every` steps and
    at the end. The batches and their augmentation depend only on `config.seed`, never on the model
    or the permutation (it is applied after augmentation).
    """
    strategy = strategy or tf.distribute.get_strategy()
    total = run_length(config, train_source.num_examples)[0]
    eval_every = eval_every or total
    with strategy.scope():
        optimizer = make_optimizer(total, model.trainable_variables, **config.optimizer_args())
        step = tf.Variable(0, dtype=tf.int64, trainable=False)
    kind = "tpu" if isinstance(strategy, tf.distribute.TPUStrategy) else "other"
    use_xla = decide_xla(config.xla, config.mixed_precision, kind)[0]
    train_steps = make_train_steps(strategy, model, optimizer, step, use_xla=use_xla, **config.step_args())
    stream = recipe_stream(strategy, train_source, config, config.seed, permutation=permutation)
    evaluate = make_evaluator(
        strategy,
        lambda images: model(images, training=False),
        eval_source,
        config.batch_size,
        config.image_size,
        config.eval_preprocessing,
        permutation,
    )
    iterator, curve, done = iter(stream), [], 0
    while done < total:
        count = min(eval_every, total - done)
        loss, _, _ = train_steps(iterator, tf.constant(count))
        done += count
        if not math.isfinite(float(loss)):
            raise TrainingDiverged(f"the loss became {float(loss)} at step {done} of this cell: lower --learning_rate")
        curve.append(dict(step=done, train_loss=float(loss), eval_top1=evaluate()[0]))
        if progress is not None:
            progress.update(done, [("loss", float(loss)), ("eval_top1", curve[-1]["eval_top1"])])
    return curve


def run(study, workdir, strategy=None, progress=True, log=print):
    """Trains every (model, order) cell not yet in WORKDIR/permutation.json on `strategy` (default:
    the current one), writing the file after each; returns the results dict. A workdir holding
    results of another recipe is refused."""
    config = study.config
    strategy = strategy or tf.distribute.get_strategy()
    set_mixed_precision(config.mixed_precision)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULTS)
    results = read_json(path)
    recipe = study.recipe()
    if os.path.exists(path) and results is None:
        raise ValueError(f"{path!r} is unreadable (not a results file): move it away, or pass --restart")
    if results is not None and results.get("recipe") != json_roundtrip(recipe):
        changed = sorted(_differences(results.get("recipe", {}), json_roundtrip(recipe)))
        raise ValueError(
            f"{workdir!r} holds a permutation study of another recipe (changed: {', '.join(changed)}): give another "
            f"--workdir, or pass --restart to start again (the earlier files move to WORKDIR/previous/)"
        )
    if results is None:
        results = dict(recipe=recipe, names=study.model_names(), cells={})
    train_source = data.load_source(config.dataset, "train", data_dir=config.data_dir, download=config.download)
    eval_split = data.eval_split(config.dataset, config.data_dir)
    eval_source = data.load_source(
        config.dataset, eval_split, data_dir=config.data_dir, class_names=train_source.class_names
    )
    total = run_length(config, train_source.num_examples)[0]
    eval_every = study.eval_every or max(1, total // 20)
    patch_size = variant_config(config.model)["patch_size"]
    results.update(
        dataset=config.dataset, eval_split=eval_split, total_steps=total, num_classes=train_source.num_classes
    )
    for kind in study.models:
        for order in study.orders:
            key = f"{kind}/{order}"
            if key in results["cells"]:
                log(f"{key}: done already (eval top-1 {results['cells'][key]['eval_top1']:.4f})")
                continue
            log(f"{results['names'][kind]} on {order} images ({total} steps)")
            permutation = make_permutation(order, config.image_size, patch_size, config.seed)
            with strategy.scope():
                model = build(kind, study, train_source.num_classes)
            bar = keras.utils.Progbar(total, stateful_metrics=["loss", "eval_top1"]) if progress else None
            curve = train_cell(model, config, train_source, eval_source, permutation, eval_every, bar, strategy)
            results["cells"][key] = dict(eval_top1=curve[-1]["eval_top1"], curve=curve, parameters=model.count_params())
            write_json(path, results)  # a finished cell is never lost
    draw(results, os.path.join(workdir, PICTURE), eval_source, config, patch_size)
    return results


def json_roundtrip(value):
    """`value` as JSON gives it back (tuples become lists): comparable with a file's contents."""
    return json.loads(json.dumps(value))


def _differences(old, new, prefix=""):
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key} {a!r} -> {b!r}"


def table(results):
    """The eval top-1 (%) of every model x order as a plain-text table."""
    orders = [o for o in ORDERS if any(k.endswith("/" + o) for k in results["cells"])]
    kinds = [k for k in MODELS if any(c.startswith(k + "/") for c in results["cells"])]
    width = max(len(results["names"][k]) for k in kinds)
    lines = [" " * width + "".join(f"{o:>10}" for o in orders)]
    for kind in kinds:
        cells = [results["cells"].get(f"{kind}/{o}") for o in orders]
        lines.append(
            f"{results['names'][kind]:<{width}}"
            + "".join(f"{c['eval_top1'] * 100:>10.1f}" if c else f"{'-':>10}" for c in cells)
        )
    return "\n".join(lines)


def draw(results, path, eval_source, config, patch_size):
    """permutation.png: per model, eval top-1 against steps for each order (as the paper's Fig. 4),
    and under the curves one evaluation image in each order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = [k for k in MODELS if any(c.startswith(k + "/") for c in results["cells"])]
    colours = dict(original="tab:blue", patches="tab:orange", pixels="tab:green")
    figure = Figure(figsize=(5 * len(kinds), 6.2), layout="constrained")
    FigureCanvasAgg(figure)
    rows = figure.subfigures(2, 1, height_ratios=[3, 1.2])
    axes = np.atleast_1d(rows[0].subplots(1, len(kinds), sharey=True))
    for ax, kind in zip(axes, kinds):
        for order in ORDERS:
            cell = results["cells"].get(f"{kind}/{order}")
            if cell:
                steps = [p["step"] for p in cell["curve"]]
                top1 = [100 * p["eval_top1"] for p in cell["curve"]]
                ax.plot(steps, top1, color=colours[order], label=f"{order} ({top1[-1]:.1f} %)")
        ax.set_title(results["names"][kind])
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    dataset = results["dataset"]
    if dataset.startswith("folder:"):  # the folder's name, not its whole path
        dataset = os.path.basename(os.path.normpath(dataset[len("folder:") :]))
    axes[0].set_ylabel(f"{dataset} {results['eval_split']} top-1 (%)")
    image = next(
        iter(
            data.eval_pipeline(
                eval_source,
                image_size=config.image_size,
                batch_size=1,
                eval_resize=config.eval_resize,
                crop_ratio=config.crop_ratio,
            )
        )
    )[0]
    examples = rows[1].subplots(1, len(ORDERS))
    for ax, order in zip(examples, ORDERS):
        permutation = make_permutation(order, config.image_size, patch_size, config.seed)
        shown = image if permutation is None else permutation(image)
        ax.imshow(np.asarray(shown)[0].astype("uint8"), interpolation="nearest")
        ax.set_title(order, color=colours[order])
        ax.set_axis_off()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))
