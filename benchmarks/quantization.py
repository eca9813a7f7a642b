"""What Keras' quantization buys a Mixer on this CPU: speed and top-1 agreement against float32, on
each Keras backend, in one run.

    python benchmarks/quantization.py --source workdir/demo [--backends tensorflow,jax,torch]
        [--model S/16] [--image_size 224] [--batch 16] [--rounds 3] [--out docs/speed/cpu_quantized]

For each backend (a process of its own, since Keras' backend is fixed per process) and each of
float32, int8 and float8 (`model.quantize(mode)`):
- speed: `model.predict_on_batch` on `--batch` random images of `--model` at `--image_size` (random
  weights: speed does not depend on their values), the median of `--rounds` timed rounds of 2 calls
  after 2 untimed ones, as images per second;
- agreement: the trained model `--source` (a .keras file or a finished workdir) quantized the same
  way, on its data set's evaluation split read by the NumPy reader (the digits for the demo): top-1
  of each mode, and the share of images whose top-1 class equals float32's.
Writes quantization.json and quantization.md (a table of ratios to float32) under `--out`.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

MODES = ("float32", "int8", "float8")


def _model_file(source):
    return os.path.join(source, "model.keras") if os.path.isdir(source) else source


def _eval_arrays(model_file):
    """(images float32 [n, H, W, 3], labels [n]) of the evaluation split the file records."""
    import numpy as np

    from keras_mixer import data
    from keras_mixer.data import arrays
    from keras_mixer.model.trained_on import TrainedOn
    from keras_mixer.weights_io.official_keys import keras_metadata

    trained_on = TrainedOn.from_dict(keras_metadata(model_file))
    source = data.load_source(trained_on.dataset, data.eval_split(trained_on.dataset))
    batches = list(
        arrays.eval_batches(
            source,
            image_size=trained_on.image_size,
            batch_size=256,
            eval_resize=trained_on.preprocessing.eval_resize,
            crop_ratio=trained_on.preprocessing.crop_ratio,
        )
    )
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def _rate(model, images, rounds):
    model.predict_on_batch(images)
    model.predict_on_batch(images)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(2):
            model.predict_on_batch(images)
        rates.append(2 * len(images) / (time.perf_counter() - start))
    return sorted(rates)[len(rates) // 2]


def measure(args):
    """One backend (this process's): {mode: {img_s, top1, top1_agreement}}."""
    import keras
    import numpy as np

    import keras_mixer

    images = np.random.default_rng(0).uniform(0, 255, (args.batch, args.image_size, args.image_size, 3))
    images = images.astype("float32")
    model_file = _model_file(args.source)
    eval_images, labels = _eval_arrays(model_file)
    results, reference = {}, None
    for mode in MODES:
        model = keras_mixer.create_model(args.model, input_shape=(args.image_size, args.image_size, 3))
        trained = keras.saving.load_model(model_file)
        if mode != "float32":
            model.quantize(mode)
            trained.quantize(mode)
        predicted = np.argmax(trained.predict(eval_images, batch_size=256, verbose=0), axis=-1)
        reference = predicted if reference is None else reference
        results[mode] = dict(
            img_s=_rate(model, images, args.rounds),
            top1=float(np.mean(predicted == labels)),
            top1_agreement=float(np.mean(predicted == reference)),
        )
        keras.backend.clear_session()
    return dict(backend=keras.backend.backend(), images=int(len(labels)), modes=results)


def _cpu():
    with open("/proc/cpuinfo") as f:
        info = f.read()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    units = sorted({u for u in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni") if f" {u}" in info})
    return f"{name} ({os.cpu_count()} cores; {' '.join(units) or 'no AMX/AVX512-BF16/VNNI'})"


def _table(runs, args):
    lines = [
        f"`python benchmarks/quantization.py --source {args.source} --backends {args.backends} --model {args.model} "
        f"--image_size {args.image_size} --batch {args.batch} --rounds {args.rounds}` on {_cpu()}.",
        "",
        f"Speed: {args.model} at {args.image_size}², batch {args.batch}, `predict_on_batch`. Agreement: the "
        f"trained `--source` on its evaluation split ({runs[0]['images']} images).",
        "",
        "| backend | mode | img/s | vs float32 | top-1 | top-1 agreement with float32 |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        base = run["modes"]["float32"]["img_s"]
        for mode, r in run["modes"].items():
            lines.append(
                f"| {run['backend']} | {mode} | {r['img_s']:.1f} | {r['img_s'] / base:.2f}x | {r['top1']:.4f} | "
                f"{r['top1_agreement']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="a trained .keras file or a finished workdir")
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--model", default="S/16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="a folder for quantization.json and quantization.md")
    parser.add_argument("--one_backend", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_backend:
        print(json.dumps(measure(args)))
        return
    runs = []
    for backend in args.backends.split(","):
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--one_backend"],
            env={**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"},
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            sys.exit(f"error: the {backend} run failed:\n{child.stderr[-3000:]}")
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    table = _table(runs, args)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "quantization.json"), "w") as f:
            json.dump(dict(cpu=_cpu(), python=platform.python_version(), args=vars(args), runs=runs), f, indent=2)
        with open(os.path.join(args.out, "quantization.md"), "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
