"""The Mixer variants by name: the paper's Table 1 and our small ones, as architecture numbers.

Below every module that builds or loads a model, so that both can read them; standard library only,
so that the benchmarks' driver reads it from its file without importing Keras.
"""

# Table 1 of the paper (S/8 from the released gsam weights). D_S = C/2 and D_C = 4C throughout.
VARIANTS = {
    "S/32": dict(patch_size=32, hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "S/16": dict(patch_size=16, hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "S/8": dict(patch_size=8, hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "B/32": dict(patch_size=32, hidden_dim=768, num_blocks=12, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "B/16": dict(patch_size=16, hidden_dim=768, num_blocks=12, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "L/32": dict(patch_size=32, hidden_dim=1024, num_blocks=24, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "L/16": dict(patch_size=16, hidden_dim=1024, num_blocks=24, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "H/14": dict(patch_size=14, hidden_dim=1280, num_blocks=32, tokens_mlp_dim=640, channels_mlp_dim=5120),
}

# Small configurations of our own (not in the paper) for demos, tests and quick experiments.
SMALL_VARIANTS = {
    "T/2": dict(patch_size=2, hidden_dim=64, num_blocks=4, tokens_mlp_dim=32, channels_mlp_dim=256),
    "T/4": dict(patch_size=4, hidden_dim=64, num_blocks=4, tokens_mlp_dim=32, channels_mlp_dim=256),
    "T/16": dict(patch_size=16, hidden_dim=128, num_blocks=4, tokens_mlp_dim=64, channels_mlp_dim=512),
}
MODEL_NAMES = (*VARIANTS, *SMALL_VARIANTS)
ARCHITECTURE = ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim")

DEFAULT_INPUT_SHAPE = (224, 224, 3)


def variant_config(variant):
    """The architecture numbers of a named variant ("B/16", or a small "T/2"), ValueError otherwise."""
    config = VARIANTS.get(variant) or SMALL_VARIANTS.get(variant)
    if config is None:
        raise ValueError(f"Unknown Mixer variant {variant!r}; valid: {', '.join(MODEL_NAMES)}")
    return dict(config)


def variant_name(variant):
    """ "B/16" -> "mixer_b16", the default model name of a variant."""
    return "mixer_" + variant.replace("/", "").lower()


def variant_of(architecture):
    """The paper's variant name ("B/16") of the five `ARCHITECTURE` numbers, or None for another
    architecture (an expanded model has a wider token MLP and is no paper variant)."""
    mine = {k: architecture[k] for k in ARCHITECTURE}
    mine["patch_size"] = _pair(mine["patch_size"])
    for name, numbers in VARIANTS.items():
        if {**numbers, "patch_size": _pair(numbers["patch_size"])} == mine:
            return name
    return None


def _pair(patch_size):
    """16 or (16, 16) -> (16, 16); the sizes here come from built models and the tables above."""
    return tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
