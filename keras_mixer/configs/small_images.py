"""Small images from scratch: a tiny Mixer on a folder of small images (sides of about 8-32 px, a few
thousand examples), a few minutes on a CPU.

    keras-mixer-pretrain --config small_images --dataset folder:PATH

Sized to the data (`keras_mixer/training/sizing.py`; --model, --image_size, --epochs or --steps
override, and the trainer prints what it picked):
    --model       T/4 (4x4 patches) when the images' median shorter side is 16 px or more, else
                  T/2 (2x2 patches): a token grid of 4x4 to 8x8 (16 px patches from 64 px up).
    --image_size  that side rounded to a multiple of the patch (8 -> 8, 25 -> 24, 28 -> 28): no
                  pixels invented by upsampling.
    --epochs      40 up to 20,000 training images, fewer above.

Why each choice differs from the ImageNet-scale defaults (checked on four data sets it was not tuned
on: 8 px digits, 28 px MNIST, 16 px texture patches, 25 px face / non-face crops; the table and the
command are in docs/training.md, `benchmarks/small_images.py`):
    epochs 40, batch 64, lr 3e-3, warmup 100 steps, weight decay 0.05
                  a few thousand images need about 40 passes; warmup is short because the run is.
    full_strength_epochs 40
                  the crops, stochastic depth and evaluation crop below are for a 40-epoch run; a
                  shorter one (--epochs 3) scales them toward none, and warms up for at most a tenth
                  of its steps: in a short budget augmentation costs more than it gives.
    crop_area_min 0.7
                  gentle random-area crops: scale and position jitter that keeps a small object
                  legible (the default 0.05 keeps a 2x2 corner of an 8x8 digit).
    flip off      a mirrored digit or letter is another symbol; turn it on (--flip) for
                  mirror-symmetric content such as textures or faces.
    drop_path 0.1 light stochastic depth against overfitting a few thousand images.
    eval crop at 0.92
                  evaluation shows objects at the scale training showed them: crops of area
                  0.7-1 resized back to the input enlarge the content by about 1/0.92 on average.
                  Plain resize would show it smaller than training did (it cost 1-10 points).
                  Without training crops (--crop_area_min 1) evaluate with --eval_resize resize
                  instead: the trainer warns about the mismatch.
"""


def get_config():
    return dict(
        mode="pretrain",
        model=None,  # these three: sized to the data
        image_size=None,
        epochs=None,
        dataset=None,  # give --dataset folder:PATH
        batch_size=64,
        optimizer="adamw",
        learning_rate=3e-3,
        weight_decay=0.05,
        schedule="warmup_linear",
        warmup_steps=100,
        full_strength_epochs=40,
        drop_path=0.1,
        crop_area_min=0.7,
        flip=False,
        eval_resize="crop",
        crop_ratio=0.92,
        workdir="workdir/small_images",
        checkpoint_every=500,
        log_every=20,
    )
