"""ImageNet-1k class names, shipped with the package, and `decode_predictions` for 1000-class heads."""

import functools
import os

import numpy as np

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CLASSES_FILE = os.path.join(_PACKAGE, "assets", "imagenet1k_classes.tsv")


@functools.lru_cache(maxsize=1)
def _classes():
    with open(_CLASSES_FILE, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")]
    return tuple(row[0] for row in rows), tuple(row[1] for row in rows)


def class_names():
    """The 1000 ImageNet-1k class names in label order ("tench", "goldfish", ...)."""
    return list(_classes()[1])


def wordnet_ids():
    """The 1000 WordNet ids in label order ("n01440764", ...)."""
    return list(_classes()[0])


def decode_predictions(preds, top=5):
    """The `top` classes of each row of ImageNet-1k scores, keras.applications style.

    Args:
        preds: scores [B, 1000] (probabilities or logits; the order is the same), a NumPy array
            or a tensor.
        top: how many classes per row.

    Returns:
        A list of B lists of (wordnet id, class name, score) tuples, highest score first.
    """
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] != 1000:
        raise ValueError(
            f"decode_predictions expects ImageNet-1k scores of shape (batch, 1000), got {preds.shape}; "
            f"for another head, use the class names the model was trained with"
        )
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= 1000:
        raise ValueError(f"top must be an integer in [1, 1000], got {top!r}")
    wnids, names = _classes()
    order = np.argsort(-preds, axis=1, kind="stable")[:, :top]
    return [[(wnids[i], names[i], float(row[i])) for i in idx] for row, idx in zip(preds, order)]
