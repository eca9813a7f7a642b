"""Argument checks shared by the layers, the model and the data pipeline.

Each returns the value in its normal form or raises ValueError naming the argument, the value and
what was expected, so a wrong call fails before anything is built.
"""

GELU_FORMS = ("tanh", "exact")


def check_positive_int(name, value):
    """Returns `value` as int, or raises ValueError naming it when it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if int(value) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_rate(name, value):
    """Returns `value` as float, or raises ValueError when it is not a probability in [0, 1)."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return rate


def check_gelu(value):
    """ "tanh" (the approximation the official weights were trained with) or "exact" (timm's erf form)."""
    if value not in GELU_FORMS:
        raise ValueError(f"gelu must be one of {GELU_FORMS}, got {value!r}")
    return value


def check_recompute(value):
    """True, False or None (decided per run; see `keras_mixer.model.layers.recomputing`)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"recompute must be True, False or None (decided by backend and device), got {value!r}")
    return value


def to_pair(name, value):
    """An int or a pair of ints -> a (height, width) tuple of positive ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
        return (check_positive_int(name, value[0]), check_positive_int(name, value[1]))
    size = check_positive_int(name, value)
    return (size, size)


def check_image_size(image_size, patch_size):
    """Raises ValueError unless both image sides are known multiples of the patch sides."""
    for side, size, patch in zip(("height", "width"), image_size, patch_size):
        if size is None:
            raise ValueError(
                f"The image {side} must be fixed (got None): the token-mixing weights depend on the "
                f"number of patches. Give input_shape=(height, width, channels)."
            )
        if size <= 0 or size % patch:
            lower, upper = max(patch, size // patch * patch), (size // patch + 1) * patch
            raise ValueError(
                f"Image {side} {size} is not a positive multiple of the patch size {patch}; "
                f"the nearest valid {side}s are {lower} and {upper}."
            )
