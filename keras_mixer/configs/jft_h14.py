"""Table 4: Mixer-H/14 on JFT-300M, 14 epochs. JFT is not public: point --dataset at your copy."""

from keras_mixer.configs._paper import paper_pretraining


def get_config():
    return paper_pretraining(
        model="H/14",
        dataset=None,
        epochs=14,
        learning_rate=1e-3,
        weight_decay=0.03,
        workdir="workdir/jft_h14",
    )
