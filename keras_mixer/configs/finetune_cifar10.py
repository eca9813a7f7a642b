"""Fine-tune Mixer-B/16 (ImageNet-21k weights) on CIFAR-10: 10k steps at 224x224."""

from keras_mixer.configs._paper import paper_finetuning


def get_config():
    return paper_finetuning(
        dataset="cifar10", steps=10_000, learning_rate=0.03, download=True, workdir="workdir/finetune_cifar10"
    )
