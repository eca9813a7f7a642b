"""Demo fine-tuning: the demo's digits Mixer (--init workdir/demo/model.keras) at 16x16, twice its
pre-training size, through the block-diagonal token-MLP expansion."""

from keras_mixer.configs._paper import paper_finetuning


def get_config():
    return paper_finetuning(
        model=None,  # taken from the .keras --init
        init="workdir/demo/model.keras",
        dataset="digits",
        image_size=16,
        batch_size=64,
        steps=300,
        warmup_steps=30,
        learning_rate=0.01,
        crop_area_min=0.7,
        flip=False,
        seed=0,
        checkpoint_every=100,
        log_every=20,
        workdir="workdir/finetune_demo",
    )
