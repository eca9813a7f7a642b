"""Fine-tune Mixer-B/16 (ImageNet-21k weights) on ImageNet-1k: 20k steps; lr from the grid {0.003, 0.01, 0.03, 0.06}."""

from keras_mixer.configs._paper import paper_finetuning


def get_config():
    return paper_finetuning(
        dataset="imagenet2012", steps=20_000, learning_rate=0.03, workdir="workdir/finetune_imagenet"
    )
