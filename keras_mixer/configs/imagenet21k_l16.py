"""Table 4: Mixer-L/16 on ImageNet-21k, 300 epochs. No public TFDS build: give --dataset
folder:PATH or your own TFDS name."""

from keras_mixer.configs._paper import paper_pretraining


def get_config():
    return paper_pretraining(
        model="L/16",
        dataset=None,
        epochs=300,
        learning_rate=1e-3,
        weight_decay=0.1,
        randaugment=20,
        mixup=0.5,
        drop_path=0.1,
        workdir="workdir/imagenet21k_l16",
    )
