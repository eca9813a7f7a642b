"""Linear few-shot probes of frozen pre-logit features: the paper's "linear 5-shot" numbers.

The probe (the closed-form evaluator the paper's few-shot numbers come from, big_vision's
`fewshot_lsr`):

    features   the Mixer's pre-logits: the pre-head LayerNorm's tokens averaged over tokens, [B, C]
               (the input of the `head` layer), with the model in inference mode.
    shots      k training examples per class, drawn at random from the train split; several draws.
    standardise  every feature dimension by the mean and standard deviation of the n = k * K shots
               (so the regulariser means the same for any model's feature scale).
    targets    one-hot mapped to {-1, +1} (big_vision's coding: every class score is pushed down for
               the other classes' shots as hard as it is pushed up for its own).
    bias       one per class, not regularised: with standardised (centred) features it is exactly
               the mean target. big_vision appends a constant column of 100 instead, the almost
               unregularised version of the same thing.
    weights    W = argmin ||Z W - T||^2 + l2 ||W||^2, solved in float64 on the host: in the dual
               W = Z^T (Z Z^T + l2 I)^-1 T when n < C (few shots), else the primal
               W = (Z^T Z + l2 I)^-1 Z^T T.
    l2         2^10 = 1024, big_vision's `common_fewshot.get_fewshot_lsr` default.
    accuracy   top-1 of argmax(x W + b) on the whole evaluation split.

Features are extracted once per split; every draw and every k reuses them. Within one draw the
shots are nested: the k-shot set is the first k of the class's shuffled examples for every k.
"""

import keras
import numpy as np

from keras_mixer.data.numpy_streams import eval_stream
from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.training.config import parse_shots

L2 = 2.0**10  # big_vision's few-shot default (configs/common_fewshot.py)
SHOTS = (1, 5, 10, 25)  # the shot counts the paper and big_vision report
TRAINING_DRAWS = 3  # draws of a probe during training (big_vision's num_seeds)
STD_EPSILON = 1e-5  # keeps the standardisation finite for a feature that is constant over the shots


# --- features ----------------------------------------------------------------------------------------


def prelogit_model(model):
    """A keras.Model from `model`'s image input to its pre-logit features [B, C].

    The features are the pre-head LayerNorm's output [B, S, C] averaged over the S tokens: the
    input of the `head` Dense layer of a classifier, computed the same way for a Mixer built with
    `include_top=False` (any `pooling`). The layers (and weights) are `model`'s own.
    """
    try:
        tokens = model.get_layer("pre_head_layer_norm").output
    except ValueError:
        raise ValueError(f"model {model.name!r} has no 'pre_head_layer_norm' layer: not an MLP-Mixer") from None
    # float32 like the model's own pooling, also under a mixed-precision policy.
    pooled = keras.layers.GlobalAveragePooling1D(dtype="float32", name="prelogits")(tokens)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, pooled, name=model.name + "_prelogits")


def features_function(model):
    """images float32 [B, H, W, 3] in [0, 255] -> pre-logits float32 [B, C] (NumPy), in inference
    mode (no dropout, no stochastic depth: nothing draws random numbers), compiled by Keras on
    either backend from the model's current variables."""
    return prelogit_model(model).predict_on_batch


def extract_features(features_fn, source, image_size, preprocessing=None, batch_size=256, verbose=1):
    """Pre-logits of every example of `source`, prepared as the model is evaluated.

    Args:
        features_fn: images float32 [B, H, W, 3] in [0, 255] -> features [B, C].
        source: a `data.Source` split.
        image_size: (H, W) or an int, the model's input size.
        preprocessing: an `EvalPreprocessing` (the one the model records; default centre crop).
        verbose: 1 shows a progress bar (batches), 0 is silent.

    Returns:
        (features float32 [N, C], labels int64 [N]) in split order.
    """
    preprocessing = preprocessing or EvalPreprocessing()
    batches = eval_stream(
        source,
        image_size=image_size,
        batch_size=batch_size,
        **preprocessing.to_dict(),  # eval_resize, crop_ratio, interpolation
    )
    total = -(-source.num_examples // batch_size) if source.num_examples else None
    progress = keras.utils.Progbar(total, unit_name="batch", verbose=verbose)
    features, labels = [], []
    for images, batch_labels in batches:
        features.append(np.asarray(features_fn(images), dtype=np.float32))
        labels.append(batch_labels)
        progress.add(1)
    if not features:
        raise ValueError(f"{source.name} split {source.split!r} has no examples")
    return np.concatenate(features), np.concatenate(labels).astype(np.int64)


# --- the probe ----------------------------------------------------------------------------------------


def fit_probe(features, labels, num_classes, l2=L2):
    """The closed-form ridge regression probe (see the module docstring).

    Args:
        features: [n, C] the shots' features. labels: int [n] in 0 .. num_classes - 1.
        l2: the ridge penalty on the weights (positive); the bias is not penalised.

    Returns:
        (W float64 [C, num_classes], b float64 [num_classes]) acting on raw features: the class
        scores of features x [m, C] are x @ W + b [m, num_classes].
    """
    if not l2 > 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    x = np.asarray(features, dtype=np.float64)
    n, dim = x.shape
    mean = x.mean(axis=0)
    std = x.std(axis=0) + STD_EPSILON
    z = (x - mean) / std  # centred: the bias decouples from the weights
    targets = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0  # [n, K] in {-1, +1}
    bias = targets.mean(axis=0)
    centred = targets - bias
    if n < dim:  # dual: an n x n system
        w = z.T @ np.linalg.solve(z @ z.T + l2 * np.eye(n), centred)
    else:  # primal: a C x C system
        w = np.linalg.solve(z.T @ z + l2 * np.eye(dim), z.T @ centred)
    # Fold the standardisation in: ((x - mean) / std) @ w + bias == x @ W + b.
    weights = w / std[:, None]
    return weights, bias - mean @ weights


def probe_accuracy(weights, bias, features, labels):
    """Top-1 of argmax(features @ W + b) against labels int [m]; features [m, C]."""
    scores = np.asarray(features, dtype=np.float64) @ weights + bias
    return float(np.mean(np.argmax(scores, axis=1) == np.asarray(labels)))


def draw_shots(labels, num_classes, max_shots, draws, seed, where="the training set"):
    """Random k-shot training sets, nested over k: int [draws, num_classes, max_shots] positions in
    `labels` (int [N]); the k-shot set of a draw is [:, :, :k] of it.

    Raises ValueError naming k and the smallest class count (of `where`) when a class has fewer
    than `max_shots` examples.
    """
    labels = np.asarray(labels)
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    counts = np.array([len(m) for m in members])
    if counts.min() < max_shots:
        smallest = int(np.argmin(counts))
        raise ValueError(
            f"{max_shots} shots per class need {max_shots} training examples of every class, but the smallest "
            f"class of {where} (label {smallest}) has {counts[smallest]}: give shots of at most {counts[smallest]}"
        )
    rng = np.random.default_rng(seed)  # its own generator: no global random state is touched
    return np.array([[rng.permutation(m)[:max_shots] for m in members] for _ in range(draws)])


def fewshot_from_draws(train_features, train_labels, drawn, test_features, test_labels, num_classes, shots, l2=L2):
    """Probe accuracies for given draws.

    Args:
        train_features: [N, C]; train_labels: int [N]. drawn: int [draws, num_classes, >= max(shots)]
            positions into them (`draw_shots`). test_features: [M, C]; test_labels: int [M].

    Returns:
        {k: dict(mean, std, min, max, accuracies=[one per draw])} for every k in `shots`.
    """
    results = {}
    for k in shots:
        accuracies = []
        for draw in drawn:
            chosen = draw[:, :k].reshape(-1)
            weights, bias = fit_probe(train_features[chosen], train_labels[chosen], num_classes, l2)
            accuracies.append(probe_accuracy(weights, bias, test_features, test_labels))
        a = np.array(accuracies)
        results[k] = dict(
            mean=float(a.mean()), std=float(a.std()), min=float(a.min()), max=float(a.max()), accuracies=accuracies
        )
    return results


def fewshot(train_features, train_labels, test_features, test_labels, num_classes, shots=SHOTS, draws=5, seed=0, l2=L2):
    """The few-shot probe over `draws` random draws of the shots.

    Args:
        train_features: [N, C] the pool the shots are drawn from; train_labels: int [N].
        test_features: [M, C]; test_labels: int [M].
        shots: the k values (shots per class). seed: the draws' seed.

    Returns:
        {k: dict(mean, std, min, max, accuracies=[one per draw])}, accuracies as fractions.
    """
    shots = parse_shots(shots)
    drawn = draw_shots(train_labels, num_classes, max(shots), draws, seed)
    return fewshot_from_draws(train_features, train_labels, drawn, test_features, test_labels, num_classes, shots, l2)


class FewshotProbe:
    """The probe of one model on one data set: shots drawn from the train split, accuracy on the
    evaluation split. Used by the command and, now and then during training, by the training loop.

    The shots are drawn once, at construction (the same images at every call and after a resume,
    so a curve over training shows the model changing, not the draw), and only the drawn train
    images are read through the model: one pass over their union, which every draw and k reuses.
    The evaluation split is read whole. Nothing here touches the training RNG or data stream: the
    draws use their own generator and the pipelines are the unshuffled evaluation ones.
    """

    def __init__(self, train_source, eval_source, shots, image_size, preprocessing, batch_size, draws=5, seed=0, l2=L2):
        if not l2 > 0:
            raise ValueError(f"l2 must be positive, got {l2}")
        if not train_source.num_examples or not eval_source.num_examples:
            raise ValueError(f"the few-shot probe needs the sizes of the {train_source.name!r} splits")
        self.shots = parse_shots(shots)
        self.num_classes = train_source.num_classes
        self.eval_source = eval_source
        self.image_size, self.preprocessing, self.batch_size, self.l2 = image_size, preprocessing, batch_size, l2
        labels = train_source.labels()  # no image decoded
        where = f"{train_source.name}/{train_source.split}"
        drawn = draw_shots(labels, self.num_classes, max(self.shots), draws, seed, where)
        needed, local = np.unique(drawn, return_inverse=True)
        self.drawn = local.reshape(drawn.shape)  # positions in the subset
        self.train_subset = train_source.subset(needed)  # only the shots are decoded
        self.train_labels = labels[needed]
        self.feature_dim = None  # known after the first call

    def __call__(self, features_fn, verbose=0):
        """{k: dict(mean, std, min, max, accuracies)} for `features_fn` (images -> pre-logits
        [B, C]); `verbose` 1 shows progress bars of the two feature passes."""
        extract = dict(
            image_size=self.image_size, preprocessing=self.preprocessing, batch_size=self.batch_size, verbose=verbose
        )
        if verbose:
            print(f"Features of the {len(self.train_labels)} drawn {self.train_subset.split} images:", flush=True)
        train_features, train_labels = extract_features(features_fn, self.train_subset, **extract)
        if not np.array_equal(train_labels, self.train_labels):  # a bug, not a user's error
            raise RuntimeError("the few-shot subset came back in another order than drawn")
        if verbose:
            print(f"Features of the {self.eval_source.num_examples} {self.eval_source.split} images:", flush=True)
        test_features, test_labels = extract_features(features_fn, self.eval_source, **extract)
        self.feature_dim = int(train_features.shape[1])
        return fewshot_from_draws(
            train_features, train_labels, self.drawn, test_features, test_labels, self.num_classes, self.shots, self.l2
        )
