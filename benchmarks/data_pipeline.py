"""Train-pipeline throughput at 224x224 from a JPEG folder: keras_mixer.data vs torchvision.

    python benchmarks/data_pipeline.py [--images 512] [--batches 80] [--rounds 2]

Writes a folder of JPEGs (500x375, smooth content plus noise, like photos in size), then runs in
separate processes, alternating: keras_mixer's tf.data train pipeline (decode -> Inception crop ->
resize 224 -> flip -> batch 64) and the torchvision peer (ImageFolder -> RandomResizedCrop(224,
scale=(0.05, 1)) -> flip -> ToTensor -> DataLoader, one worker per core). Reports images/s and
the ratio; the machine is shared, so only the ratio within one run means much.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BATCH = 64


def make_folder(root, count):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(count):
        folder = os.path.join(root, "train", f"class_{i % 4}")
        os.makedirs(folder, exist_ok=True)
        base = np.stack([(xx * (i % 7 + 1) + yy) % 256, (yy * 2 + i) % 256, (xx + yy * (i % 3)) % 256], -1)
        image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
        Image.fromarray(image).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def run_keras(root, batches):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras_mixer import data

    source = data.load_source(f"folder:{root}", "train")
    dataset = data.train_pipeline(source, image_size=224, batch_size=BATCH)
    iterator = iter(dataset)
    for _ in range(3):  # warm-up: tracing, thread pools, file cache
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * BATCH / (time.perf_counter() - start)


def run_torch(root, batches):
    import torch
    from torchvision import datasets, transforms

    augment = transforms.Compose(
        [transforms.RandomResizedCrop(224, scale=(0.05, 1.0)), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    folder = datasets.ImageFolder(os.path.join(root, "train"), transform=augment)
    loader = torch.utils.data.DataLoader(
        folder, batch_size=BATCH, shuffle=True, num_workers=os.cpu_count(), drop_last=True, persistent_workers=True
    )

    def forever():
        while True:
            yield from loader

    iterator = forever()
    for _ in range(3):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * BATCH / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batches", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=["keras", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rate = (run_keras if args.worker == "keras" else run_torch)(args.root, args.batches)
        print(json.dumps({"images_per_second": rate}))
        return
    with tempfile.TemporaryDirectory() as root:
        make_folder(root, args.images)
        rates = {"keras": [], "torch": []}
        for _ in range(args.rounds):
            for worker in rates:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", worker, "--root", root, "--batches", str(args.batches)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                rates[worker].append(json.loads(out.stdout.strip().splitlines()[-1])["images_per_second"])
    best = {k: max(v) for k, v in rates.items()}
    print(f"machine: {os.cpu_count()} CPU cores; {args.images} JPEGs of 500x375 -> 224x224, batch {BATCH}")
    for worker, values in rates.items():
        print(f"{worker:>6}: best {best[worker]:7.1f} images/s  (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"ratio keras_mixer / torchvision: {best['keras'] / best['torch']:.2f}")


if __name__ == "__main__":
    main()
