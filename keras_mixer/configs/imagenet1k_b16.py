"""Table 4: Mixer-B/16 on ImageNet-1k from scratch, 300 epochs (reported 76.44 % top-1)."""

from keras_mixer.configs._paper import paper_pretraining


def get_config():
    return paper_pretraining(
        model="B/16",
        dataset="imagenet2012",
        epochs=300,
        learning_rate=1e-3,
        weight_decay=0.1,
        randaugment=15,
        mixup=0.5,
        drop_path=0.1,
        workdir="workdir/imagenet1k_b16",
    )
