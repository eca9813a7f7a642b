"""Table 4: Mixer-L/16 on JFT-300M, 7 epochs (the paper also runs 14). JFT is not public: point
--dataset at your copy."""

from keras_mixer.configs._paper import paper_pretraining


def get_config():
    return paper_pretraining(
        model="L/16", dataset=None, epochs=7, learning_rate=1e-3, weight_decay=0.03, workdir="workdir/jft_l16"
    )
