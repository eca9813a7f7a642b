"""Table 4: Mixer-S/16 on JFT-300M, 5 epochs. JFT is not public: point --dataset at your copy."""

from keras_mixer.configs._paper import paper_pretraining


def get_config():
    return paper_pretraining(
        model="S/16", dataset=None, epochs=5, learning_rate=3e-3, weight_decay=0.03, workdir="workdir/jft_s16"
    )
