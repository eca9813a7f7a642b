"""Demo: the small_images recipe on the embedded digits set, >= 95 % test top-1 in a few minutes on
a CPU; the default of pretrain.py. Sized to its data as small_images is (8x8 images: a T/2 Mixer
with 2x2 patches at 8 px, 40 epochs), so `--dataset folder:PATH` sizes itself to that folder."""

from keras_mixer.configs import small_images


def get_config():
    return {
        **small_images.get_config(),
        "dataset": "digits",
        "seed": 0,
        "workdir": "workdir/demo",
        "checkpoint_every": 200,
    }
