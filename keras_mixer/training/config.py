"""Training configuration: one dataclass, filled from a recipe file and then from flags.

A recipe is a small Python file with `get_config()` returning a dict of `TrainConfig` fields (the
shipped ones are package data in `keras_mixer/configs/`); fields not in the recipe keep the
defaults below.
"""

import dataclasses
import importlib.util
import math
import os
import traceback
from typing import Optional

from keras_mixer.models import MODEL_NAMES
from keras_mixer.preprocessing import EvalPreprocessing

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("bfloat16", "float16")
SERVING_PRECISIONS = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("warmup_linear", "warmup_cosine")
XLA = ("auto", "on", "off")
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclasses.dataclass
class TrainConfig:
    # What to train, on what.
    mode: str = "pretrain"  # or "finetune"
    model: Optional[str] = "T/2"  # a name from keras_mixer.models.MODEL_NAMES
    init: Optional[str] = None  # finetune: .keras, official .npz, timm file or preset name
    dataset: Optional[str] = "digits"  # TFDS name, "folder:PATH" or "digits"
    data_dir: Optional[str] = None
    download: bool = False
    image_size: int = 8
    # How long, how fast.
    batch_size: int = 64  # global
    epochs: Optional[float] = None
    steps: Optional[int] = None
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.1  # decoupled, multiplied by the learning rate (Keras AdamW)
    momentum: float = 0.9  # SGD
    beta_1: float = 0.9
    beta_2: float = 0.999
    schedule: str = "warmup_linear"
    warmup_steps: int = 10_000
    grad_clip_norm: Optional[float] = 1.0
    # Regularisation and augmentation.
    randaugment: Optional[float] = None  # magnitude m, 2 ops
    mixup: Optional[float] = None  # Beta alpha
    dropout: float = 0.0
    drop_path: float = 0.0
    crop_area_min: float = 0.05
    flip: bool = True
    eval_resize: str = "crop"
    crop_ratio: float = 0.875
    shuffle_buffer: int = 10_000
    cache: bool = False
    # Bookkeeping.
    seed: Optional[int] = None
    workdir: str = "workdir"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50
    eval_every: int = 0  # steps; 0: only at the end
    # Steps between linear few-shot probes (keras_mixer.training.fewshot), also at the end; 0: off.
    fewshot_every: int = 0
    fewshot_shots: tuple = (1, 5, 10, 25)  # shots per class of those probes
    steps_per_loop: int = 1
    export: bool = True
    export_precision: str = "float32"  # of the TF Serving export: "float32" or "bfloat16"
    write_worker_weights: bool = False  # multi-worker diagnostics: every worker writes its final weights
    # Where it runs.
    strategy: str = "auto"
    tpu: Optional[str] = None
    mixed_precision: Optional[str] = None
    xla: str = "auto"

    def validate(self):
        """Raises ValueError naming the first field that is out of range or conflicts."""
        _choice("mode", self.mode, ("pretrain", "finetune"))
        if self.model is not None:
            _choice("model", self.model, MODEL_NAMES)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("xla", self.xla, XLA)
        _choice("export_precision", self.export_precision, SERVING_PRECISIONS)
        if self.mixed_precision is not None:
            _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        if self.dataset is None:
            raise ValueError("this recipe has no data set: give --dataset (a TFDS name, folder:PATH or digits)")
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs and steps")
        if self.mode == "finetune" and not self.init:
            raise ValueError("fine-tuning needs --init (a .keras, official .npz or timm file, or a preset name)")
        if self.model is None and not self.init:
            raise ValueError("give --model (or an --init whose weights carry the architecture)")
        if self.tpu is not None and self.strategy not in ("auto", "tpu"):
            raise ValueError(f"--tpu conflicts with --strategy={self.strategy}")
        for name in ("batch_size", "checkpoint_every", "log_every", "steps_per_loop", "image_size", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be 0 (only at the end) or positive, got {self.eval_every}")
        if isinstance(self.fewshot_every, bool) or not isinstance(self.fewshot_every, int) or self.fewshot_every < 0:
            raise ValueError(
                "fewshot_every must be 0 (no few-shot probes) or a positive number of steps, "
                f"got {self.fewshot_every!r}"
            )
        shots = self.fewshot_shots
        if (
            not isinstance(shots, (list, tuple))
            or not shots
            or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in shots)
        ):
            raise ValueError(
                f"fewshot_shots must be a non-empty list of positive integers (e.g. 1,5,10,25), got {shots!r}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 < self.crop_area_min <= 1:
            raise ValueError(f"crop_area_min must be in (0, 1], got {self.crop_area_min}")
        self.eval_preprocessing  # checks eval_resize and crop_ratio
        return self

    @property
    def eval_preprocessing(self):
        """How this run evaluates (and its export serves): recorded with everything it writes."""
        return EvalPreprocessing(self.eval_resize, self.crop_ratio)


# Fields that say where and how a run is looked after, not what it computes: a resumed run may
# change them freely. Every other field changes the computation (or its reported results), and a
# resumed run must keep it unless the change is accepted (`--accept_changes`). The few-shot probes
# only read the model in inference mode, through unshuffled pipelines and their own random
# generator: a run ends with bit-identical weights with or without them (tests/test_fewshot.py).
OPERATIONAL_FIELDS = frozenset(
    {
        "workdir",
        "data_dir",
        "download",
        "cache",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "eval_every",
        "fewshot_every",
        "fewshot_shots",
        "steps_per_loop",
        "export",
        "export_precision",
        "write_worker_weights",
        "strategy",
        "tpu",
        "xla",
    }
)


class RecipeChanged(ValueError):
    """A resumed run was given a recipe that differs from the one it was started with."""


def recipe_changes(recorded, config):
    """[(field, recorded value, new value)] for every computation field that differs."""
    new = dataclasses.asdict(config)
    changed = []
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        if name in OPERATIONAL_FIELDS:
            continue
        old = recorded.get(name, field.default)
        if _normalise(old) != _normalise(new[name]):
            changed.append((name, old, new[name]))
    return changed


def _normalise(value):
    # JSON turns tuples into lists and may turn 3.0 into 3: compare values, not spellings.
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


def check_resumed_recipe(recorded, config, accept=()):
    """The accepted changes [(field, old, new)] of a resumed run; RecipeChanged for the others.

    Args:
        recorded: the recipe the workdir's run was started with (run.json "config"), or None when
            that file is missing or unreadable.
        accept: field names whose change is accepted, or ("all",).
    """
    if recorded is None:
        if "all" in accept:
            return []
        raise RecipeChanged(
            "the workdir holds checkpoints but its run.json (the recipe they were trained with) is missing or "
            "unreadable, so a changed recipe cannot be ruled out: put run.json back, or pass --accept_changes=all "
            "to resume with the recipe given now"
        )
    changes = recipe_changes(recorded, config)
    refused = [c for c in changes if c[0] not in accept and "all" not in accept]
    if refused:
        listing = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in refused)
        names = ",".join(name for name, _, _ in refused)
        raise RecipeChanged(
            f"the workdir's run was started with another recipe; changed: {listing}. Resume with the recorded "
            f"values, pass --accept_changes={names} to continue with the new ones (recorded in run.json), or "
            f"--restart to start again from step 0 (the current run is moved to WORKDIR/previous/)"
        )
    return changes


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, choices))}")


def run_length(config, num_examples):
    """(total steps, steps per epoch) of a run of `config` on a split of `num_examples` (None: unknown;
    one long epoch, and the length must be given in steps)."""
    steps_per_epoch = max(1, num_examples // config.batch_size) if num_examples else None
    if config.steps is not None:
        total = int(config.steps)
    elif steps_per_epoch is None:
        raise ValueError(f"the size of {config.dataset!r} is unknown: give --steps instead of --epochs")
    else:
        total = max(1, int(math.ceil(config.epochs * steps_per_epoch)))
    return total, steps_per_epoch or total


def recipe_names(configs_dir=CONFIGS_DIR):
    """The shipped recipes' names, sorted."""
    return sorted(f[:-3] for f in os.listdir(configs_dir) if f.endswith(".py") and not f.startswith("_"))


def recipe_path(name_or_path, configs_dir=CONFIGS_DIR):
    """A recipe name ("demo") -> configs_dir/demo.py; a path is returned as is."""
    if os.path.isfile(name_or_path):
        return name_or_path
    path = os.path.join(configs_dir, f"{name_or_path}.py")
    if not os.path.isfile(path):
        raise ValueError(
            f"unknown recipe {name_or_path!r}; recipes: {', '.join(recipe_names(configs_dir))} "
            "(or a path to a .py file)"
        )
    return path


def load_config(name_or_path, configs_dir=CONFIGS_DIR, **overrides):
    """Reads a recipe file, then applies `overrides` (flags; None values are ignored)."""
    path = recipe_path(name_or_path, configs_dir)
    spec = importlib.util.spec_from_file_location(f"keras_mixer_recipe_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        fields = module.get_config()
    except Exception as e:  # a user's recipe file: its error is the user's to fix, not a crash of ours
        line = next(
            (frame.lineno for frame in reversed(traceback.extract_tb(e.__traceback__)) if frame.filename == path), "?"
        )
        raise ValueError(f"recipe {path!r} failed at line {line}: {type(e).__name__}: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(
            f"recipe {path!r}: get_config() must return a dict of TrainConfig fields, got {type(fields).__name__}"
        )
    fields = dict(fields)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    # A length given on the command line replaces the recipe's, whichever unit it uses.
    if "steps" in overrides or "epochs" in overrides:
        fields.pop("steps", None), fields.pop("epochs", None)
    fields.update(overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"recipe {path!r} sets unknown fields {unknown}")
    return TrainConfig(**fields)


def paper_pretraining(**row):
    """The paper's pre-training setup (224x224, Adam 0.9/0.999 with decoupled weight decay, 10k
    warmup steps then linear decay, batch 4096, clipping at 1) with one row of Table 4 on top."""
    defaults = dict(
        mode="pretrain",
        image_size=224,
        batch_size=4096,
        optimizer="adamw",
        beta_1=0.9,
        beta_2=0.999,
        schedule="warmup_linear",
        warmup_steps=10_000,
        grad_clip_norm=1.0,
        checkpoint_every=1000,
        log_every=100,
        steps_per_loop=100,
        mixed_precision="bfloat16",
    )
    return {**defaults, **row}


def paper_finetuning(**task):
    """The paper's fine-tuning setup (SGD momentum 0.9, 500 warmup steps then cosine, clipping at 1,
    no weight decay, batch 512, a zero head for a new class count) with one task on top."""
    defaults = dict(
        mode="finetune",
        model="B/16",
        init="imagenet21k",
        image_size=224,
        batch_size=512,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=0.0,
        schedule="warmup_cosine",
        warmup_steps=500,
        grad_clip_norm=1.0,
        checkpoint_every=500,
        log_every=50,
    )
    return {**defaults, **task}
