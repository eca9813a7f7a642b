"""Training throughput of the trainers' loop with and without XLA (the `--xla` decision).

    python benchmarks/xla_training.py [--model B/16] [--batch_size 8] [--steps 12]

Runs the real training loop (`keras_mixer.training.train`) on the embedded digits resized to
224x224, once with XLA on and once off, each in its own process, and reports the steady-state
images/s (median of the later steps) and the ratio. Keras' jit_compile="auto" would pick "off" on
CPU and under tf.distribute.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

WORKER = """
import json, sys
from keras_mixer.training import TrainConfig, train
model, batch, steps, xla, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
m = train(TrainConfig(model=model, image_size=224, batch_size=batch, steps=steps, log_every=1, xla=xla,
                      export=False, checkpoint_every=10**6, warmup_steps=1, workdir=workdir, seed=0))
print(json.dumps(m["images_per_second"]))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="B/16")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "3"}
    rates = {}
    with tempfile.TemporaryDirectory() as workdir:
        for xla in ("on", "off"):
            out = subprocess.run(
                [sys.executable, "-c", WORKER, args.model, str(args.batch_size), str(args.steps), xla, f"{workdir}/{xla}"],
                check=True, capture_output=True, text=True, env=env,
            )  # fmt: skip
            rates[xla] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"machine: {os.cpu_count()} CPU cores; Mixer-{args.model} training at 224x224, batch {args.batch_size}")
    print(f"XLA on : {rates['on']:.2f} images/s\nXLA off: {rates['off']:.2f} images/s")
    print(f"ratio on / off: {rates['on'] / rates['off']:.2f}")


if __name__ == "__main__":
    main()
