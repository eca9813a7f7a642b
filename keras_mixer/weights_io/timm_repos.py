"""timm's Mixer weights as timm publishes them: a repo folder (on the Hugging Face Hub or local)
holding timm's `config.json` and `model.safetensors`.

    config.json   {"architecture": "mixer_b16_224", "num_classes": 1000, "pretrained_cfg": {"tag":
                  "miil_in21k_ft_in1k", "input_size": [3, 224, 224], "mean": [0, 0, 0], "std": [1, 1, 1],
                  "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center", ...}, ...}
    model.safetensors   the timm state_dict (read by `weight_files`)

What the weights need beside their arrays comes from `pretrained_cfg`: the pixel normalisation
(mean and std, which the model applies inside), the evaluation resize (interpolation) and crop
(crop_pct), the input size and the class count; these go into the `TrainedOn` record, so evaluation,
prediction, the export and fine-tuning use them. No Keras here.
"""

import json
import os
import re

from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.model.trained_on import TrainedOn
from keras_mixer.model.variants import VARIANTS

CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")

# timm's Mixer architectures: mixer_{s,b,l}{32,16}_224 -> the paper's variant.
_ARCHITECTURE = re.compile(r"^mixer_([sbl])(32|16)_224$")

# timm's published Mixer weights (timm 1.0: `timm.list_pretrained("mixer*")`), on the Hugging Face
# Hub as timm/<architecture>.<tag>. Top-1 on ImageNet-1k validation where a number is published.
_GOOGLE = dict(pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3, interpolation="bicubic", crop_ratio=0.875)
_MIIL = dict(pixel_mean=(0.0,) * 3, pixel_std=(1.0,) * 3, interpolation="bilinear", crop_ratio=0.875)
TIMM_WEIGHTS = {
    "mixer_b16_224.miil_in21k_ft_in1k": dict(
        _MIIL,
        classes=1000,
        trained_on="ImageNet-21K-P (MIIL), fine-tuned on ImageNet-1k",
        top1=0.823,
        top1_source="timm pull request 651 (MIIL's ImageNet-21K-P pre-training)",
    ),
    "mixer_b16_224.miil_in21k": dict(_MIIL, classes=11221, trained_on="ImageNet-21K-P (MIIL)"),
    "mixer_b16_224.goog_in21k_ft_in1k": dict(
        _GOOGLE,
        classes=1000,
        trained_on="ImageNet-21k (Google), fine-tuned on ImageNet-1k",
        top1=0.766,
        top1_source="timm's ImageNet-1k validation results for mixer_b16_224 (76.6 %)",
    ),
    "mixer_b16_224.goog_in21k": dict(_GOOGLE, classes=21843, trained_on="ImageNet-21k (Google)"),
    "mixer_l16_224.goog_in21k_ft_in1k": dict(
        _GOOGLE, classes=1000, trained_on="ImageNet-21k (Google), fine-tuned on ImageNet-1k"
    ),
    "mixer_l16_224.goog_in21k": dict(_GOOGLE, classes=21843, trained_on="ImageNet-21k (Google)"),
}


def hub_presets():
    """{"hf://timm/<name>": metadata} of timm's published Mixer weights, as `list_presets` lists them."""
    presets = {}
    for name, meta in TIMM_WEIGHTS.items():
        architecture = name.split(".")[0]
        presets[f"hf://timm/{name}"] = dict(
            variant=variant_of_architecture(architecture),
            release=f"timm {name.split('.')[1]}",
            classes=meta["classes"],
            trained_on=meta["trained_on"],
            image_size=224,
            gelu="exact",
            pixel_mean=list(meta["pixel_mean"]),
            pixel_std=list(meta["pixel_std"]),
            eval_preprocessing=EvalPreprocessing("crop", meta["crop_ratio"], meta["interpolation"]).to_dict(),
            top1=meta.get("top1"),
            top1_source=meta.get("top1_source"),
        )
    return presets


def variant_numbers(variant):
    """{patch, width, blocks} of a paper variant, as `weights.architecture_of` reads weights."""
    numbers = VARIANTS[variant]
    return dict(patch=(numbers["patch_size"],) * 2, width=numbers["hidden_dim"], blocks=numbers["num_blocks"])


def variant_of_architecture(architecture):
    """ "mixer_b16_224" (or "mixer_b16_224.tag") -> "B/16"; None for any other timm model."""
    found = _ARCHITECTURE.match(architecture.split(".")[0])
    return None if found is None else f"{found.group(1).upper()}/{found.group(2)}"


class TimmRepo:
    """A timm repo folder read: `architecture` ("mixer_b16_224"), `expected` (the patch, width and
    blocks the weights must have: the architecture's, or its `model_args`' where timm's
    `save_for_hf` recorded others), `weights` (the state_dict file), `classes`, `input_shape`
    (H, W, 3) and `trained_on` (with the normalisation and evaluation preprocessing of its
    `pretrained_cfg`)."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        path = os.path.join(self.folder, CONFIG)
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path!r} is not timm's config.json ({e})") from None
        self.architecture = str(config.get("architecture", ""))
        variant = variant_of_architecture(self.architecture)
        if variant is None:
            raise ValueError(
                f"{self.folder!r} holds timm's {self.architecture!r}, not an MLP-Mixer: keras_mixer reads timm's "
                f"mixer_{{s,b,l}}{{32,16}}_224 weights ({', '.join(sorted(TIMM_WEIGHTS))})"
            )
        found = [os.path.join(self.folder, name) for name in WEIGHTS if os.path.isfile(os.path.join(self.folder, name))]
        if not found:
            raise FileNotFoundError(f"timm repo folder {self.folder!r} has no {' or '.join(WEIGHTS)}")
        self.weights = found[0]
        cfg, args = config.get("pretrained_cfg") or {}, config.get("model_args") or {}
        numbers = VARIANTS[variant]
        self.expected = dict(
            patch=(args.get("patch_size", numbers["patch_size"]),) * 2,
            width=args.get("embed_dim", numbers["hidden_dim"]),
            blocks=args.get("num_blocks", numbers["num_blocks"]),
        )
        self.classes = config.get("num_classes", cfg.get("num_classes"))
        channels, height, width = cfg.get("input_size", (3, 224, 224))
        if "img_size" in args:
            height, width = args["img_size"] if hasattr(args["img_size"], "__len__") else (args["img_size"],) * 2
        self.input_shape = (int(height), int(width), int(args.get("in_chans", channels)))
        if cfg.get("crop_mode", "center") != "center":
            raise ValueError(
                f"{path!r}: crop_mode {cfg['crop_mode']!r} is not read here (timm's Mixer weights use 'center')"
            )
        tag = cfg.get("tag")
        self.name = self.architecture + (f".{tag}" if tag else "")
        label_names = config.get("label_names") or cfg.get("label_names")
        if label_names is None and self.classes == 1000:
            from keras_mixer.weights_io.imagenet_classes import class_names

            label_names = class_names()
        self.trained_on = TrainedOn(
            dataset="imagenet2012" if self.classes == 1000 else None,
            class_names=label_names,
            preprocessing=EvalPreprocessing(
                "crop", float(cfg.get("crop_pct", 0.875)), cfg.get("interpolation", "bicubic")
            ),
            model=variant if self.expected == variant_numbers(variant) else None,
            image_size=self.input_shape[:2],
            pixel_mean=cfg.get("mean", (0.5,) * 3),
            pixel_std=cfg.get("std", (0.5,) * 3),
        )
