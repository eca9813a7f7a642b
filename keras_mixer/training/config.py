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
import typing
from typing import Optional

from keras_mixer.configs._paper import paper_finetuning, paper_pretraining  # noqa: F401  (version 0.2's recipes import them here)
from keras_mixer.model import pixels, precisions
from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.model.variants import MODEL_NAMES

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("warmup_linear", "warmup_cosine")
XLA = ("auto", "on", "off")
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _field(default, help, *, choices=None, operational=False, flag=True):
    """One row of the table of training fields.

    help: the field's flag help (every trainer's `--help`).
    choices: the valid values (and None where the field's type is Optional).
    operational: says where and how a run is looked after, not what it computes: a resumed run may
        change it freely (`OPERATIONAL_FIELDS`). Every other field changes the computation or its
        reported results, and a resumed run keeps it unless the change is accepted.
    flag: whether the trainers have a flag for it (`mode` is the program's, `init` fine-tuning's).
    """
    metadata = dict(help=help, choices=choices, operational=operational, flag=flag)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Every field of a training run, with its flag help, its valid values and whether a resumed
    run may change it: the one table the flags, `validate` and the resume check read."""

    # What to train, on what.
    mode: str = _field("pretrain", "pretrain or finetune.", choices=("pretrain", "finetune"), flag=False)
    model: Optional[str] = _field(
        "T/2",
        f"Mixer variant: {', '.join(MODEL_NAMES)} (None in pre-training: sized to the data).",
        choices=MODEL_NAMES,
    )
    init: Optional[str] = _field(
        None, "Weights to start from: .keras, official .npz, timm file, or a preset name.", flag=False
    )
    dataset: Optional[str] = _field("digits", "A TFDS name (imagenet2012, cifar10, ...), folder:PATH or digits.")
    data_dir: Optional[str] = _field(None, "TFDS data directory.", operational=True)
    download: bool = _field(False, "Download and prepare a TFDS data set if needed.", operational=True)
    image_size: Optional[int] = _field(8, "Square input size in pixels (None: sized to the data).")
    # How long, how fast.
    batch_size: int = _field(64, "Global batch size (all replicas).")
    epochs: Optional[float] = _field(None, "Training length in epochs (neither this nor steps: sized to the data).")
    steps: Optional[int] = _field(None, "Training length in steps.")
    optimizer: str = _field("adamw", "adamw (pre-training) or sgd with momentum (fine-tuning).", choices=OPTIMIZERS)
    learning_rate: float = _field(1e-3, "Peak learning rate.")
    weight_decay: float = _field(0.1, "Decoupled weight decay, multiplied by the learning rate (adamw).")
    momentum: float = _field(0.9, "Momentum (sgd).")
    beta_1: float = _field(0.9, "Adam beta_1 (adamw).")
    beta_2: float = _field(0.999, "Adam beta_2 (adamw).")
    schedule: str = _field("warmup_linear", "Linear warmup, then linear or cosine decay to 0.", choices=SCHEDULES)
    warmup_steps: int = _field(10_000, "Linear warmup steps.")
    grad_clip_norm: Optional[float] = _field(1.0, "Clip the all-reduced gradient to this global norm.")
    # Regularisation and augmentation.
    randaugment: Optional[float] = _field(None, "RandAugment magnitude m (2 ops).")
    mixup: Optional[float] = _field(None, "Mixup Beta alpha.")
    dropout: float = _field(0.0, "Dropout inside the MLPs.")
    drop_path: float = _field(0.0, "Stochastic depth rate of the last block.")
    crop_area_min: float = _field(0.05, "Smallest area share of the training crops (1: no crops).")
    flip: bool = _field(True, "Random horizontal flips in training.")
    eval_resize: str = _field(
        "crop", "Evaluation (and serving): centre crop or plain resize.", choices=pixels.EVAL_RESIZE
    )
    crop_ratio: float = _field(0.875, "Centre-crop share of the resized image for --eval_resize=crop.")
    full_strength_epochs: Optional[float] = _field(
        None,
        "The run length the crops, stochastic depth and evaluation crop are set for: a shorter run scales them "
        "toward none and warms up for at most a tenth of its steps (None: as set).",
    )
    shuffle_buffer: int = _field(10_000, "Examples in the training shuffle buffer.")
    cache: bool = _field(False, "Keep the decoded training images in memory.", operational=True)
    # Bookkeeping.
    seed: Optional[int] = _field(None, "Seed for initialisation, data order and augmentation (deterministic ops).")
    workdir: str = _field(
        "workdir", "Checkpoints, TensorBoard logs, metrics.json and the export go here.", operational=True
    )
    checkpoint_every: int = _field(500, "Steps between checkpoints.", operational=True)
    keep_checkpoints: int = _field(3, "Checkpoints kept (the newest ones).", operational=True)
    cluster_timeout: float = _field(
        900,
        "Seconds a run over several machines (TF_CONFIG workers, or the JAX backend's processes) waits at start "
        "for every one of them.",
        operational=True,
    )
    log_every: int = _field(50, "Steps between TensorBoard points (and log-file progress lines).", operational=True)
    eval_every: int = _field(0, "Steps between evaluations (0: only at the end).", operational=True)
    # The few-shot probes only read the model in inference mode, through unshuffled pipelines and
    # their own random generator: a run ends with bit-identical weights with or without them
    # (tests/test_fewshot.py), so they are operational.
    fewshot_every: int = _field(
        0,
        "Steps between linear few-shot probes of the pre-logits on the run's data set, also run at the end "
        "(TensorBoard fewshot/{k}shot, metrics.json fewshot; 0: none).",
        operational=True,
    )
    fewshot_shots: tuple = _field(
        (1, 5, 10, 25), "Shots per class of the few-shot probes, a comma list.", operational=True
    )
    steps_per_loop: int = _field(
        1, "Steps per host call on TensorFlow (raise on TPUs); JAX queues them to the next log point.", operational=True
    )
    export: bool = _field(True, "Write the TF Serving export at the end.", operational=True)
    export_precision: str = _field(
        "float32",
        "Precision of that export: bfloat16 is several times faster on serving CPUs with AMX or AVX512-BF16, "
        "slower on CPUs without them.",
        choices=tuple(precisions.SERVING),
        operational=True,
    )
    write_worker_weights: bool = _field(
        False, "Every worker writes its final weights (multi-worker diagnostics).", operational=True
    )
    # Where it runs.
    strategy: str = _field(
        "auto", "tf.distribute strategy; auto picks from the machine.", choices=STRATEGIES, operational=True
    )
    tpu: Optional[str] = _field(None, "TPU name or address; bare --tpu means the local TPU VM.", operational=True)
    mixed_precision: Optional[str] = _field(None, "Mixed precision compute dtype.", choices=precisions.MIXED)
    flags_given: tuple = _field(
        (), "The fields the command line set: the length scaling keeps them as given.", operational=True, flag=False
    )
    xla: str = _field(
        "auto",
        "XLA for the training step (auto: per device and precision, printed at the start: off for bfloat16 on "
        "CPUs with AMX or AVX512-BF16 and on TPUs, on elsewhere).",
        choices=XLA,
        operational=True,
    )

    def validate(self):
        """Raises ValueError naming the first field that is out of range or conflicts."""
        for field in dataclasses.fields(self):
            value, choices = getattr(self, field.name), field.metadata["choices"]
            if choices and not (value is None and accepts_none(field)) and value not in choices:
                raise ValueError(f"unknown {field.name} {value!r}; valid: {', '.join(map(str, choices))}")
        if self.dataset is None:
            raise ValueError("this recipe has no data set: give --dataset (a TFDS name, folder:PATH or digits)")
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give one of epochs and steps, not both")
        if self.mode == "finetune" and not self.init:
            raise ValueError("fine-tuning needs --init (a .keras, official .npz or timm file, or a preset name)")
        if self.tpu is not None and self.strategy not in ("auto", "tpu"):
            raise ValueError(f"--tpu conflicts with --strategy={self.strategy}")
        positive = ("batch_size", "checkpoint_every", "log_every", "steps_per_loop", "image_size", "keep_checkpoints")
        for name in (*positive, "shuffle_buffer"):
            if name == "image_size" and self.image_size is None:
                continue  # sized to the data
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if not self.cluster_timeout > 0:
            raise ValueError(f"cluster_timeout must be a positive number of seconds, got {self.cluster_timeout}")
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
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be 0 or positive, got {self.warmup_steps}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be positive (None: no clipping), got {self.grad_clip_norm}")
        if self.full_strength_epochs is not None and not self.full_strength_epochs > 0:
            raise ValueError(
                f"full_strength_epochs must be positive (None: no scaling), got {self.full_strength_epochs}"
            )
        if not 0 < self.crop_area_min <= 1:
            raise ValueError(f"crop_area_min must be in (0, 1], got {self.crop_area_min}")
        self.eval_preprocessing  # checks eval_resize and crop_ratio
        return self

    def optimizer_args(self):
        """The fields `step.make_optimizer` takes, by name, and its loss scaling (float16)."""
        names = "optimizer learning_rate warmup_steps schedule weight_decay momentum beta_1 beta_2".split()
        return dict({name: getattr(self, name) for name in names}, loss_scaling=self.mixed_precision == "float16")

    def step_args(self):
        """The fields `step.make_train_steps` takes, by its names."""
        return dict(global_batch=self.batch_size, clip_norm=self.grad_clip_norm)

    @property
    def eval_preprocessing(self):
        """How this run evaluates (and its export serves): recorded with everything it writes."""
        return EvalPreprocessing(self.eval_resize, self.crop_ratio)


def accepts_none(field):
    """Whether a `TrainConfig` field may be None (its type is Optional)."""
    return type(None) in typing.get_args(field.type)


# Fields a resumed run may change freely (see `_field`); every other one it keeps unless accepted.
OPERATIONAL_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["operational"])
FLAG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["flag"])


def parse_shots(value, name="shots"):
    """A comma list ("1,5,10") or a sequence of ints -> a sorted tuple of distinct positive ints;
    ValueError naming `name` and the value otherwise."""
    items = value.split(",") if isinstance(value, str) else list(value)
    shots = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not text.isdigit() or int(text) <= 0:
            raise ValueError(f"{name} must be a comma list of positive integers (e.g. 1,5,10,25), got {value!r}")
        shots.append(int(text))
    if not shots:
        raise ValueError(f"{name} must be a comma list of positive integers (e.g. 1,5,10,25), got {value!r}")
    return tuple(sorted(set(shots)))


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
    """Reads a recipe file, then applies `overrides` (the flags given; a None clears a field)."""
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
    # A length given on the command line replaces the recipe's, whichever unit it uses.
    if "steps" in overrides or "epochs" in overrides:
        fields.pop("steps", None), fields.pop("epochs", None)
    fields.update(overrides)
    fields["flags_given"] = tuple(sorted(overrides))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"recipe {path!r} sets unknown fields {unknown}")
    return TrainConfig(**fields)
