"""decode_predictions and the shipped ImageNet-1k class names."""

import os

import numpy as np
import pytest

import keras_mixer
from keras_mixer.weights_io import imagenet_classes


def test_class_names_are_the_ilsvrc_label_order():
    wnids, names = imagenet_classes.wordnet_ids(), imagenet_classes.class_names()
    assert len(wnids) == len(set(wnids)) == len(names) == 1000
    assert wnids == sorted(wnids)  # ILSVRC 2012 labels are the sorted WordNet ids
    timm = pytest.importorskip("timm")  # an independent copy of the synset list
    with open(os.path.join(os.path.dirname(timm.__file__), "data", "_info", "imagenet_synsets.txt")) as f:
        assert wnids == f.read().split()
    # Well-known labels: 0 tench, 1 goldfish, 281 tabby (cat), 999 toilet tissue.
    assert [names[i] for i in (0, 1, 281, 999)] == ["tench", "goldfish", "tabby", "toilet tissue"]


def test_decode_predictions_ranks_each_row():
    scores = np.zeros((2, 1000), "float32")
    scores[0, [281, 7, 999]] = [0.5, 0.3, 0.2]
    scores[1, 0] = 1.0
    decoded = keras_mixer.decode_predictions(scores, top=3)
    assert [name for _, name, _ in decoded[0]] == ["tabby", "cock", "toilet tissue"]
    assert decoded[0][0] == ("n02123045", "tabby", 0.5)
    assert decoded[1][0][:2] == ("n01440764", "tench") and len(decoded[1]) == 3


@pytest.mark.parametrize(
    "scores, top, pattern",
    [
        (np.zeros((2, 10)), 5, r"shape \(batch, 1000\), got \(2, 10\)"),
        (np.zeros(1000), 5, r"got \(1000,\)"),
        (np.zeros((1, 1000)), 0, r"top must be an integer in \[1, 1000\], got 0"),
    ],
)
def test_decode_predictions_refuses_other_heads(scores, top, pattern):
    with pytest.raises(ValueError, match=pattern):
        keras_mixer.decode_predictions(scores, top=top)
