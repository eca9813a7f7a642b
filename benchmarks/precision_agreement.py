"""Does a bfloat16 export say what its float32 self says? Top-1 agreement on a real test split.

    python benchmarks/precision_agreement.py --source workdir/demo [--dataset digits] [--split test]

Exports `--source` (a workdir, `.keras` file, checkpoint or preset) twice into a temporary folder,
as `trainers/export.py --precision float32` and `--precision bfloat16` would, loads both back and
feeds their `serving_images` signatures the same uint8 images: the split prepared as the source
was evaluated. Prints one line per precision and a JSON summary: images, top-1 of each, the
share of images where the two top-1 classes agree, and the largest difference between the two
exports' probabilities of any class (max |p_bf16 - p_fp32|).
"""

import argparse
import json
import tempfile

import numpy as np


def agreement(source, dataset=None, split=None, data_dir=None, batch_size=256):
    """The summary dict (see the module docstring) for `source`."""
    import tensorflow as tf

    from keras_mixer import data
    from keras_mixer.serving.export import export_saved_model
    from keras_mixer.serving.trained_models import load_keras_model

    model, trained_on = load_keras_model(source)
    dataset = dataset or trained_on.dataset
    if dataset is None:
        raise ValueError(f"give --dataset: {source!r} does not record what it was trained on")
    split = split or data.eval_split(dataset, data_dir)
    images_source = data.load_source(dataset, split, data_dir=data_dir, class_names=trained_on.class_names)
    preprocessing = trained_on.preprocessing
    stream = data.eval_pipeline(
        images_source,
        image_size=model.input_shape[1:3],
        batch_size=batch_size,
        **preprocessing.to_dict(),  # eval_resize, crop_ratio, interpolation
    )
    batches = [(tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8), y.numpy()) for x, y in stream]
    labels = np.concatenate([y for _, y in batches])
    probabilities = {}
    with tempfile.TemporaryDirectory() as folder:
        for precision in ("float32", "bfloat16"):
            export = export_saved_model(
                model, f"{folder}/{precision}", preprocessing=preprocessing, precision=precision
            )
            serve = tf.saved_model.load(export).signatures["serving_images"]
            probabilities[precision] = np.concatenate([serve(images=x)["probabilities"].numpy() for x, _ in batches])
    fp32, bf16 = probabilities["float32"], probabilities["bfloat16"]
    return dict(
        source=str(source),
        dataset=dataset,
        split=split,
        images=int(len(labels)),
        top1_float32=float(np.mean(fp32.argmax(1) == labels)),
        top1_bfloat16=float(np.mean(bf16.argmax(1) == labels)),
        top1_agreement=float(np.mean(fp32.argmax(1) == bf16.argmax(1))),
        max_probability_difference=float(np.abs(fp32 - bf16).max()),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="a workdir, .keras file, checkpoint or preset")
    parser.add_argument("--dataset", default=None, help="default: the one the source records")
    parser.add_argument("--split", default=None, help="default: validation if it exists, else test")
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args()
    summary = agreement(args.source, args.dataset, args.split, args.data_dir)
    print(
        f"{summary['dataset']}/{summary['split']}, {summary['images']} images: "
        f"top-1 float32 {summary['top1_float32']:.4f}, "
        f"bfloat16 {summary['top1_bfloat16']:.4f}; top-1 agreement {summary['top1_agreement']:.4f}; "
        f"largest probability difference {summary['max_probability_difference']:.2e}"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
