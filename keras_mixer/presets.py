"""Named pretrained weights: the official releases, fetched into the Keras cache on first use.

`MixerB16(weights="imagenet21k")` downloads
https://storage.googleapis.com/mixer_models/imagenet21k/Mixer-B_16.npz to
`~/.keras/models/keras_mixer/` (or `$KERAS_HOME`). Set `KERAS_MIXER_WEIGHTS_URL` to a mirror
(any URL prefix urllib can read, `file://` included) for machines without access to that bucket.
"""

import os

import keras

DEFAULT_BASE_URL = "https://storage.googleapis.com/mixer_models/"

# preset -> (variants it exists for, classes, what the head was trained on).
PRESETS = {
    "imagenet1k": (("B/16", "L/16"), 1000, "ImageNet-1k"),
    "imagenet21k": (("B/16", "L/16"), 21843, "ImageNet-21k"),
    "sam": (("B/16", "B/32"), 1000, "ImageNet-1k, SAM optimizer"),
    "gsam": (("S/8", "S/16", "S/32", "B/16", "B/32"), 1000, "ImageNet-1k, GSAM optimizer"),
}
ALIASES = {"imagenet": "imagenet1k"}


class PresetUnavailable(OSError):
    """A preset's weights file could not be fetched; the message says how to supply it."""


def presets_for(variant):
    """The preset names published for a variant such as "B/16"."""
    return [name for name, (variants, _, _) in PRESETS.items() if variant in variants]


def preset_url(name, variant):
    """The URL of a preset's .npz, or ValueError naming what exists."""
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"Unknown weights preset {name!r}; presets: {', '.join(PRESETS)} (or a file path)")
    if variant not in PRESETS[name][0]:
        available = ", ".join(presets_for(variant)) or "none"
        raise ValueError(
            f"Preset {name!r} is published for {', '.join(PRESETS[name][0])}, not for "
            f"{variant or 'this custom configuration'}; presets for it: {available}"
        )
    base = os.environ.get("KERAS_MIXER_WEIGHTS_URL", DEFAULT_BASE_URL)
    return f"{base.rstrip('/')}/{name}/Mixer-{variant.replace('/', '_')}.npz"


def fetch_preset(name, variant):
    """Downloads a preset once into the Keras cache and returns its local path."""
    url = preset_url(name, variant)
    fname = f"mixer_{ALIASES.get(name, name)}_{variant.replace('/', '_')}.npz"
    # KERAS_HOME is read now, not at Keras import. The folder must exist: get_file silently falls
    # back to /tmp/.keras for a cache folder that is missing.
    cache_dir = os.environ.get("KERAS_HOME") or os.path.expanduser(os.path.join("~", ".keras"))
    os.makedirs(cache_dir, exist_ok=True)
    try:
        return keras.utils.get_file(
            fname, origin=url, cache_dir=cache_dir, cache_subdir=os.path.join("models", "keras_mixer")
        )
    except Exception as e:  # urllib, HTTP and file errors arrive wrapped in several types
        reason = " ".join(str(e).split())[:200]
        raise PresetUnavailable(
            f"Could not download the {name!r} weights for {variant} from {url} ({reason}). Offline or behind a "
            f"firewall: put the file on a mirror and set KERAS_MIXER_WEIGHTS_URL to its prefix (https://... or "
            f"file:///folder holding {ALIASES.get(name, name)}/Mixer-{variant.replace('/', '_')}.npz), or pass "
            f"the local file itself as weights='/path/Mixer-{variant.replace('/', '_')}.npz'."
        ) from None


def is_preset_name(weights):
    return isinstance(weights, str) and (weights in PRESETS or weights in ALIASES)
