"""Demo: the small_images recipe on the embedded digits set (8x8 images, a T/2 Mixer with 2x2
patches), >= 95 % test top-1 in a few minutes on a CPU; the default of pretrain.py."""

from keras_mixer.configs import small_images


def get_config():
    return {
        **small_images.get_config(),
        "model": "T/2",
        "dataset": "digits",
        "image_size": 8,
        "seed": 0,
        "workdir": "workdir/demo",
        "checkpoint_every": 200,
    }
