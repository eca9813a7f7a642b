"""The CNN baseline of the permutation study: a small ResNet of Keras layers.

    ResNet-10 (widths 16, 32; 2 basic blocks per stage):
      rescale to [-1, 1] -> stem -> stage 1 (2 blocks, width 16)
      -> stage 2 (2 blocks, width 32, stride 2) -> global average pool -> Dense(classes)

The stem is a 3x3 convolution at stride 1 for small images (side <= 32 px, as CIFAR ResNets) and
the ImageNet stem (7x7 at stride 2, then 3x3 max-pool at stride 2) for larger ones. Depth: stem +
2 convolutions per block + head = 2 + 4 * stages layers (10 for two stages). A basic block is
conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (a 1x1 conv-BN where the shape changes), then ReLU.

Input: images [B, H, W, 3] in [0, 255], like the Mixer (`include_preprocessing`). Output: logits
[B, classes].
"""

import keras
from keras import layers

from keras_mixer.argument_checks import check_positive_int
from keras_mixer.model.pixels import PIXEL_OFFSET, PIXEL_SCALE

SMALL_IMAGE_SIDE = 32  # up to this side the stem keeps the full resolution


def resnet_name(widths=(16, 32), blocks_per_stage=2):
    """ "ResNet-10 (widths 16-32)": its depth and widths, as the study's table names it."""
    depth = 2 + 2 * blocks_per_stage * len(widths)
    return f"ResNet-{depth} (widths {'-'.join(map(str, widths))})"


def small_resnet(input_shape, classes, widths=(16, 32), blocks_per_stage=2, name="resnet"):
    """A ResNet of `len(widths)` stages; every stage after the first halves the resolution."""
    widths = [check_positive_int("resnet width", w) for w in widths]
    if not widths:
        raise ValueError("the ResNet needs at least one stage width")
    check_positive_int("blocks_per_stage", blocks_per_stage)
    images = layers.Input(shape=input_shape, name="images")
    x = layers.Rescaling(PIXEL_SCALE, offset=PIXEL_OFFSET, name="rescaling")(images)
    if max(input_shape[:2]) <= SMALL_IMAGE_SIDE:
        x = _conv_bn(x, widths[0], 3, 1, "stem")
    else:
        x = _conv_bn(x, widths[0], 7, 2, "stem")
        x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, width in enumerate(widths):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, width, stride, f"stage{stage}_block{block}")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = layers.Dense(classes, name="head")(x)
    return keras.Model(images, logits, name=name)


def _conv_bn(x, width, kernel, stride, name):
    x = layers.Conv2D(width, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    # Momentum 0.9 (PyTorch's default): the study's runs are a few hundred steps, and with Keras'
    # 0.99 the moving statistics that evaluation uses lag the weights by ~100 steps (measured:
    # train loss 0.03 while eval top-1 was still at 50-80 %).
    return layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)


def _basic_block(x, width, stride, name):
    shortcut = x
    if stride != 1 or x.shape[-1] != width:
        shortcut = _conv_bn(x, width, 1, stride, f"{name}_shortcut")
    y = layers.ReLU(name=f"{name}_relu1")(_conv_bn(x, width, 3, stride, f"{name}_1"))
    y = _conv_bn(y, width, 3, 1, f"{name}_2")
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))
