"""Named pretrained weights: the official releases, fetched into the Keras cache on first use.

Presets are named keras-hub style, `mixer_<variant>_<release>` ("mixer_b16_imagenet1k"). The file
of `mixer_b16_imagenet21k` is https://storage.googleapis.com/mixer_models/imagenet21k/Mixer-B_16.npz,
downloaded once to `~/.keras/models/keras_mixer/` (or `$KERAS_HOME`). Set `KERAS_MIXER_WEIGHTS_URL`
to a mirror (any URL prefix urllib can read, `file://` included) for machines without access to
that bucket.
"""

import os

import keras

from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.model.variants import variant_name
from keras_mixer.weights_io.timm_repos import hub_presets

DEFAULT_BASE_URL = "https://storage.googleapis.com/mixer_models/"

# release folder -> (variants published, head classes, what the weights were trained on).
RELEASES = {
    "imagenet1k": (("B/16", "L/16"), 1000, "ImageNet-1k"),
    "imagenet21k": (("B/16", "L/16"), 21843, "ImageNet-21k"),
    "sam": (("B/16", "B/32"), 1000, "ImageNet-1k, SAM optimizer"),
    "gsam": (("S/8", "S/16", "S/32", "B/16", "B/32"), 1000, "ImageNet-1k, GSAM optimizer"),
}
ALIASES = {"imagenet": "imagenet1k"}
# Top-1 on the ImageNet-1k validation set where a number is published; others are unknown here.
REPORTED_TOP1 = {("imagenet1k", "B/16"): (0.7644, "paper, Table 2: trained from scratch on ImageNet-1k")}
# The official evaluation: resize to 256, centre crop 224.
OFFICIAL_EVAL = EvalPreprocessing(eval_resize="crop", crop_ratio=0.875)


def _preset_name(variant, release):
    return f"{variant_name(variant)}_{release}"


def _describe(variant, release):
    variants, classes, trained_on = RELEASES[release]
    top1, top1_source = REPORTED_TOP1.get((release, variant), (None, None))
    return dict(
        variant=variant,
        release=release,
        classes=classes,
        trained_on=trained_on,
        image_size=224,
        gelu="tanh",
        file=f"{release}/Mixer-{variant.replace('/', '_')}.npz",
        eval_preprocessing=OFFICIAL_EVAL.to_dict(),
        top1=top1,
        top1_source=top1_source,
    )


PRESETS = {
    _preset_name(variant, release): _describe(variant, release)
    for release, (variants, _, _) in RELEASES.items()
    for variant in variants
}


class PresetUnavailable(OSError):
    """A preset's weights file could not be fetched; the message says how to supply it."""


def list_presets():
    """{preset name: metadata}: variant, release, classes, trained_on, image_size, gelu, file,
    eval_preprocessing, top1 (a fraction, or None where no number is published) and top1_source.
    timm's published Mixer weights are listed by their hub names ("hf://timm/mixer_b16_224.
    miil_in21k_ft_in1k"), which `from_preset` loads, with their pixel_mean and pixel_std."""
    return {**{name: dict(meta) for name, meta in PRESETS.items()}, **hub_presets()}


def is_preset_name(source):
    return isinstance(source, str) and (source in PRESETS or source in RELEASES or source in ALIASES)


def resolve(source, variant=None):
    """A preset name, or a release ("imagenet21k") with the variant it is asked for -> the preset
    name; ValueError naming what exists otherwise."""
    if source in PRESETS:
        if variant is not None and PRESETS[source]["variant"] != variant:
            raise ValueError(f"Preset {source!r} holds {PRESETS[source]['variant']} weights, not {variant}")
        return source
    release = ALIASES.get(source, source)
    if release not in RELEASES:
        raise ValueError(f"Unknown weights preset {source!r}; presets: {', '.join(PRESETS)} (or a weights file path)")
    if variant not in RELEASES[release][0]:
        available = ", ".join(n for n, meta in PRESETS.items() if meta["variant"] == variant) or "none"
        raise ValueError(
            f"Release {release!r} is published for {', '.join(RELEASES[release][0])}, not for "
            f"{variant or 'this custom configuration'}; presets for it: {available}"
        )
    return _preset_name(variant, release)


def preset_url(name):
    base = os.environ.get("KERAS_MIXER_WEIGHTS_URL", DEFAULT_BASE_URL)
    return f"{base.rstrip('/')}/{PRESETS[name]['file']}"


def fetch_preset(name):
    """Downloads a preset's weights file once into the Keras cache and returns its local path."""
    url = preset_url(name)
    file = PRESETS[name]["file"]
    # KERAS_HOME is read now, not at Keras import. The folder must exist: get_file silently falls
    # back to /tmp/.keras for a cache folder that is missing.
    cache_dir = os.environ.get("KERAS_HOME") or os.path.expanduser(os.path.join("~", ".keras"))
    os.makedirs(cache_dir, exist_ok=True)
    try:
        return keras.utils.get_file(
            f"{name}.npz", origin=url, cache_dir=cache_dir, cache_subdir=os.path.join("models", "keras_mixer")
        )
    except Exception as e:  # urllib, HTTP and file errors arrive wrapped in several types
        reason = " ".join(str(e).split())[:200]
        raise PresetUnavailable(
            f"Could not download the {name!r} weights from {url} ({reason}). Offline or behind a firewall: put "
            f"the file on a mirror and set KERAS_MIXER_WEIGHTS_URL to its prefix (https://... or file:///folder "
            f"holding {file}), or pass the local file itself as weights='/path/{os.path.basename(file)}'."
        ) from None
