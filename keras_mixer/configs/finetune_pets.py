"""Fine-tune Mixer-B/16 (ImageNet-21k weights) on Oxford-IIIT Pets: 500 steps."""

from keras_mixer.configs._paper import paper_finetuning


def get_config():
    return paper_finetuning(
        dataset="oxford_iiit_pet",
        steps=500,
        learning_rate=0.01,
        download=True,
        workdir="workdir/finetune_pets",
    )
