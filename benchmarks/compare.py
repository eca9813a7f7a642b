"""Speed side by side: keras_mixer against timm and the Flax model with the official parameter tree.

    python benchmarks/compare.py [--models B/16,S/16] [--tasks inference,training] [--rounds 2]
        [--batch 16] [--train_batch 16] [--steps 3] [--warmup 2] [--dtype float32|bfloat16] [--out DIR]
        [--image_size 224] [--expand_from 0] [--only NAMES] [--timeout 1800]

Every measurement runs in a process of its own (frameworks never share a process; torchvision and
TensorFlow cannot), the measurements of a round run one after another, and the order alternates
from round to round, so slow phases of a shared machine spread over all of them. A measurement
builds its model, runs `--warmup` untimed steps (tracing, compilation, allocator warm-up) and then
times `--steps` steps, each ended by reading a result back to the host. Reported per measurement:
images/s = batch / (median step time), the median over rounds.

The whole training loops (`... loop`) report their own images/s, a mean over their steady-state
calls (steps queue between host reads; a median of single steps cannot be taken). Their cost,
"what the loop costs beside its bare step", is therefore set against the bare step's mean rate of
the same round, batch x steps / (sum of step times): a median would leave out the step's slow
outliers that the loop's mean keeps (`loop_costs` in compare.json, a line under the table).

What is measured (training: AdamW, gradient clipping at global norm 1, softmax cross-entropy):

    keras_mixer tf predict       TF backend, `model.predict_on_batch` (weights as variables)
    keras_mixer tf xla           TF backend, `tf.function(jit_compile=True)` of the model
    keras_mixer tf frozen        `keras_mixer.freeze(model, dtype)`: the weights frozen into one TF
                                 graph, the Python inference path (never expanded)
    keras_mixer tf export        the TF Serving export (`export_saved_model(precision=dtype)`),
                                 loaded back, its `serving_images` signature fed uint8 images
    keras_mixer tf trainers      the trainers' step (`keras_mixer.training.tf.step.make_train_steps`),
                                 XLA or not as `--xla auto` decides for this device and dtype
    keras_mixer tf trainers xla  the same with XLA forced on (left out unless named in --only)
    keras_mixer tf trainers fwd+bwd   the same with XLA on the forward and backward pass only (as
                                 under several replicas; left out unless named in --only)
    keras_mixer tf loop          the whole training loop (`keras_mixer.training.train`) on the digits
                                 resized to the image size, input pipeline included: the img/s it
                                 reports itself (steady state: its first call left out; never expanded)
    keras_mixer jax predict      JAX backend, `model.predict_on_batch`
    keras_mixer jax jit          JAX backend, `jax.jit` of `model.stateless_call`
    keras_mixer jax step         JAX backend, `keras_mixer.JaxTrainStep` (state on the device, donated)
    keras_mixer jax step no recompute   the same with the model's `recompute=False`: the GELUs'
                                 intermediates kept for the backward pass, not recomputed (the
                                 default recomputes them on a GPU; left out unless named in --only)
    keras_mixer jax loop         the whole training loop on the JAX backend (`train` hands it to
                                 `training.jax.engine`), as `keras_mixer tf loop`: input included
    keras_mixer jax train_on_batch   JAX backend, compiled Keras `train_on_batch`
    timm eager / timm compile    `timm.create_model("mixer_b16_224")`, eager and `torch.compile`;
                                 with --dtype bfloat16 under bf16 autocast (float32 weights)
    timm eager / compile bf16 weights   the same with the weights and images cast to bf16
                                 (--dtype bfloat16 only). The best timm row is "timm best".
    flax jit                     a Flax module with the official tree (`jax.jit`, optax for training)
    torch / jax / tf matmuls only (+ " train")   a ceiling, not a model: only the model's matrix
                                 products (`matmuls`), on random operands drawn once, in torch
                                 (eager), XLA (`jax.jit`) or TF without XLA (oneDNN; weights as
                                 variables). `tf matmuls only frozen`: the weights as constants of
                                 the graph, as `tf frozen` and `tf export` have them. No model can
                                 run faster than the matrix products it needs, so a target above
                                 this row is out of reach with that framework's matrix products
                                 (left out unless named)

keras_mixer's models get random weights (no bias is zero, as in a trained model: TF's graph
optimizer folds a zero bias away, and with it the fusion of bias and GELU into the product).

Alongside: the machine's matmul rate per engine (n^3 matmuls in torch, TF without XLA, TF with XLA
and JAX, per round; n = 2048 on a CPU, 8192 on a GPU, which small matmuls cannot fill) and FLOPs
per image from the architecture (2 per multiply-add of the stem, the token and channel MLPs and
the head; a training step counts 3 forward passes), so every figure also reads as a share of what
its own engine's matrix products can do (a TF row without XLA against TF without XLA, and so on);
a share above 1 is a broken measurement. The table's header names the CPU and its matrix units
(AMX, AVX512-BF16, AVX512-VNNI), which decide bf16 speed. Peak memory is the accelerator's peak
where there is one, else the process's peak resident size above its size with the framework
imported.

Where TensorFlow is not installed (a GPU machine with only JAX and torch) its measurements are
listed as skipped, and the JAX backend stands for keras_mixer. Peers come from the test extra:
`pip install -e ".[test]"`. Writes DIR/compare.md (a table), DIR/summary.md (the same figures, one
row per measurement and one column per model and task, which the docs include), DIR/compare.json
and DIR/compare.png, the tables and JSON again after every measurement, so a run cut short keeps
what it measured. A measurement that runs past --timeout seconds is stopped and listed as failed.
`--render DIR` writes DIR/summary.md from its compare.json alone (after a change to its format).
"""

import argparse
import atexit
import functools
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (framework, task); the framework decides the process's imports.
MEASUREMENTS = {
    "keras_mixer tf predict": ("tf", "inference"),
    "keras_mixer tf xla": ("tf", "inference"),
    "keras_mixer tf frozen": ("tf", "inference"),
    "keras_mixer tf export": ("tf", "inference"),
    "keras_mixer jax predict": ("jax", "inference"),
    "keras_mixer jax jit": ("jax", "inference"),
    "timm eager": ("torch", "inference"),
    "timm compile": ("torch", "inference"),
    "timm eager bf16 weights": ("torch", "inference"),
    "timm compile bf16 weights": ("torch", "inference"),
    "flax jit": ("flax", "inference"),
    "keras_mixer tf trainers": ("tf", "training"),
    "keras_mixer tf trainers xla": ("tf", "training"),
    "keras_mixer tf trainers fwd+bwd": ("tf", "training"),
    "keras_mixer tf loop": ("tf", "training"),
    "keras_mixer jax step": ("jax", "training"),
    "keras_mixer jax loop": ("jax", "training"),
    "keras_mixer jax step no recompute": ("jax", "training"),
    "keras_mixer jax train_on_batch": ("jax", "training"),
    "timm eager train": ("torch", "training"),
    "timm compile train": ("torch", "training"),
    "flax optax": ("flax", "training"),
    "torch matmuls only": ("torch", "inference"),
    "jax matmuls only": ("jax", "inference"),
    "tf matmuls only": ("tf", "inference"),
    "tf matmuls only frozen": ("tf", "inference"),
    "torch matmuls only train": ("torch", "training"),
    "jax matmuls only train": ("jax", "training"),
    "tf matmuls only train": ("tf", "training"),
}
PEERS = ("timm", "flax")
# Measured only when --only names them: A/Bs of one lever each against the default.
OPTIONAL = ("keras_mixer tf trainers xla", "keras_mixer tf trainers fwd+bwd", "keras_mixer jax step no recompute")
OPTIONAL += tuple(name for name in MEASUREMENTS if "matmuls only" in name)  # ceilings
BF16_ONLY = ("timm eager bf16 weights", "timm compile bf16 weights")  # the same as autocast in float32
# The engines whose n^3 matmul rate is measured; a row's share of the matmul rate is its engine's.
ENGINES = ("torch", "tf", "tf_xla", "jax")
ENGINE_NAMES = dict(torch="torch", tf="TF", tf_xla="TF+XLA", jax="XLA (JAX)")
MODULES = dict(tf=["tensorflow", "keras"], jax=["jax", "keras"], torch=["torch", "timm"], flax=["jax", "flax", "optax"])
TIMM_NAMES = {  # the paper's variants timm has, the models compared
    "S/16": "mixer_s16_224",
    "B/16": "mixer_b16_224",
    "L/16": "mixer_l16_224",
    "S/32": "mixer_s32_224",
    "B/32": "mixer_b32_224",
}
CLASSES = 1000


def _package_file(name):
    """keras_mixer/<name>.py ("model/variants") loaded from its file (it imports nothing of the
    package): importing the package would import Keras, and with it TensorFlow, into the driver
    beside every measurement."""
    spec = importlib.util.spec_from_file_location(
        f"keras_mixer_{name.replace('/', '_')}", os.path.join(ROOT, "keras_mixer", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_VARIANTS = _package_file("model/variants")
# patch, hidden C, blocks, D_S, D_C (the paper's Table 1)
ARCHITECTURES = {name: tuple(_VARIANTS.VARIANTS[name][k] for k in _VARIANTS.ARCHITECTURE) for name in TIMM_NAMES}


def forward_flops(model, image_size, classes=CLASSES, expanded_from=0):
    """FLOPs of one image's forward pass: 2 per multiply-add of the stem, the MLPs and the head
    (LayerNorm, GELU and additions are a fraction of a percent and left out). `expanded_from`: the
    side the model was trained at before the block-diagonal expansion, whose token MLP is K^2 times
    wider (computed densely, zeros included)."""
    patch, width, blocks, tokens_hidden, channels_hidden = ARCHITECTURES[model]
    tokens = (image_size // patch) ** 2
    if expanded_from:
        tokens_hidden *= (image_size // expanded_from) ** 2
    stem = tokens * patch * patch * 3 * width
    block = 2 * width * tokens * tokens_hidden + 2 * tokens * width * channels_hidden
    return 2 * (stem + blocks * block + width * classes)


def matmuls(model, image_size, batch, training, classes=CLASSES):
    """The matrix products of one step as (m, k, n) shapes: [m, k] @ [k, n]. Forward: the stem (one
    row per patch), each block's token MLP (one row per channel), its channel MLP (one row per
    token) and the head. Training adds each product's two gradients, [m, n] @ [n, k] for the input
    and [k, m] @ [m, n] for the kernel."""
    patch, width, blocks, tokens_hidden, channels_hidden = ARCHITECTURES[model]
    tokens = (image_size // patch) ** 2
    block = [
        (batch * width, tokens, tokens_hidden),
        (batch * width, tokens_hidden, tokens),
        (batch * tokens, width, channels_hidden),
        (batch * tokens, channels_hidden, width),
    ]
    forward = [(batch * tokens, patch * patch * 3, width)] + block * blocks + [(batch, width, classes)]
    if not training:
        return forward
    return forward + [(m, n, k) for m, k, n in forward] + [(k, m, n) for m, k, n in forward]


# --- workers: one measurement per process -----------------------------------------------------------


def _timed(step, sync, warmup, steps):
    """Seconds of each of `steps` calls of `step` after `warmup` untimed ones; `sync(result)` waits
    for the result on the host."""
    for _ in range(warmup):
        sync(step())
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        sync(step())
        seconds.append(time.perf_counter() - started)
    return seconds


def _resident():
    """The process's resident size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_memory(framework, baseline):
    """Peak accelerator memory in bytes where there is one, else the process's peak resident size
    above `baseline` (its size with the framework imported, before the model was built)."""
    if framework == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated()
    if framework in ("jax", "flax"):
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"]
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def _keras_model(model, image_size, dtype, expand_from=0, recompute=None):
    """keras_mixer's `model` at `image_size`, or built at `expand_from` and expanded to it, with
    random weights (see the module docstring); under mixed_bfloat16 for dtype "bfloat16"."""
    import keras
    import numpy as np

    import keras_mixer

    if dtype == "bfloat16":
        keras.config.set_dtype_policy("mixed_bfloat16")
    side = expand_from or image_size
    net = keras_mixer.create_model(
        model, input_shape=(side, side, 3), classes=CLASSES, classifier_activation=None, recompute=recompute
    )
    rng = np.random.default_rng(0)
    net.set_weights([w + rng.normal(0, 0.02, w.shape).astype(w.dtype) for w in net.get_weights()])
    return keras_mixer.expand_resolution(net, image_size) if expand_from else net


def _images(batch, image_size, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch, image_size, image_size, 3)).astype("float32")
    labels = rng.integers(0, CLASSES, batch)
    return images, labels


def worker_tf(name, model, batch, options):
    """(seconds per step, extra fields): `xla` for the training rows, whether XLA compiled the step."""
    image_size, dtype, warmup, steps = options.image_size, options.dtype, options.warmup, options.steps
    import tensorflow as tf

    images, labels = _images(batch, image_size)
    precision = "bfloat16" if dtype == "bfloat16" else None
    if name == "keras_mixer tf loop":
        metrics = _whole_loop(model, batch, options)
        return [batch / metrics["images_per_second"]], dict(xla=metrics["xla"])
    if name.startswith("keras_mixer tf trainers"):
        from keras_mixer.training.optimizer import make_optimizer
        from keras_mixer.training.tf.step import decide_xla, make_train_steps

        xla = "on" if name.endswith(("xla", "fwd+bwd")) else "auto"
        use_xla = decide_xla(xla, precision, "default")[0]
        net = _keras_model(model, image_size, dtype, options.expand_from)
        optimizer = make_optimizer(10**6, net.trainable_variables, learning_rate=1e-3, warmup_steps=1)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        train_steps = make_train_steps(
            tf.distribute.get_strategy(),
            net,
            optimizer,
            step_var,
            global_batch=batch,
            clip_norm=1.0,
            use_xla=use_xla,
            whole_step=not name.endswith("fwd+bwd"),
        )
        one_hot = tf.one_hot(labels, CLASSES)
        iterator = iter(tf.data.Dataset.from_tensors((images, one_hot)).repeat())
        seconds = _timed(lambda: train_steps(iterator, tf.constant(1))[0], lambda loss: float(loss), warmup, steps)
        return seconds, dict(xla=use_xla)
    if name in ("keras_mixer tf frozen", "keras_mixer tf export"):
        net = _keras_model(model, image_size, "float32")  # frozen in `dtype` below
        served = _served(name, net, dtype, options)
        return _timed(served, lambda out: out.numpy(), warmup, steps), {}
    net = _keras_model(model, image_size, dtype, options.expand_from)
    if name == "keras_mixer tf predict":
        return _timed(lambda: net.predict_on_batch(images), lambda out: out, warmup, steps), {}
    forward = tf.function(lambda x: net(x, training=False), jit_compile=True)
    tensor = tf.constant(images)
    return _timed(lambda: forward(tensor), lambda out: out.numpy(), warmup, steps), {}


def _whole_loop(model, batch, options):
    """metrics.json of `keras_mixer.training.train` (either backend, as the process runs Keras) for
    warmup + steps steps on the digits resized to the image size: its steady-state img/s leaves
    its first host call out; no checkpoint, evaluation only at the end, no export. The recipe's own
    log_every (a TensorBoard point every 50 steps), as a real run logs."""
    import tempfile

    from keras_mixer.training import TrainConfig, train

    with tempfile.TemporaryDirectory() as workdir:
        return train(
            TrainConfig(
                model=model,
                image_size=options.image_size,
                batch_size=batch,
                steps=options.warmup + options.steps,
                export=False,
                checkpoint_every=10**6,
                warmup_steps=1,
                workdir=workdir,
                seed=0,
                mixed_precision="bfloat16" if options.dtype == "bfloat16" else None,
            )
        )


def _served(name, net, dtype, options):
    """A call that runs `net`'s frozen graph on one batch: `freeze` (float input), or the TF
    Serving export loaded back (uint8 input to its `serving_images` signature)."""
    import tempfile

    import tensorflow as tf

    from keras_mixer.serving.export import export_saved_model, freeze

    images, _ = _images(options.batch, options.image_size)
    if name == "keras_mixer tf frozen":
        frozen, tensor = freeze(net, dtype), tf.constant(images)
        return lambda: frozen(tensor)
    folder = tempfile.mkdtemp(prefix="compare-export-")
    atexit.register(shutil.rmtree, folder, True)
    loaded = tf.saved_model.load(export_saved_model(net, folder, precision=dtype))
    pixels = tf.constant(images.astype("uint8"))
    return lambda: loaded.signatures["serving_images"](images=pixels)["logits"]


def worker_jax(name, model, batch, options):
    image_size, dtype, warmup, steps = options.image_size, options.dtype, options.warmup, options.steps
    import jax
    import keras

    if name == "keras_mixer jax loop":
        return [batch / _whole_loop(model, batch, options)["images_per_second"]]
    images, labels = _images(batch, image_size)
    net = _keras_model(
        model, image_size, dtype, options.expand_from, recompute=False if "no recompute" in name else None
    )
    if name == "keras_mixer jax predict":
        return _timed(lambda: net.predict_on_batch(images), lambda out: out, warmup, steps)
    if name == "keras_mixer jax jit":
        forward = jax.jit(lambda trainable, fixed, x: net.stateless_call(trainable, fixed, x, training=False)[0])
        trainable = [v.value for v in net.trainable_variables]
        fixed = [v.value for v in net.non_trainable_variables]
        x = jax.numpy.asarray(images)
        return _timed(lambda: forward(trainable, fixed, x), lambda out: out.block_until_ready(), warmup, steps)
    # Inputs already on the device, as every peer's: the steps differ only in what they do.
    images, labels = jax.numpy.asarray(images), jax.numpy.asarray(labels)
    if name.startswith("keras_mixer jax step"):
        import keras_mixer

        train = keras_mixer.JaxTrainStep(net, keras.optimizers.AdamW(1e-3, weight_decay=0.1), clip_norm=1.0)
        carry = [train.initial_state()]

        def step():
            carry[0], metrics = train(carry[0], images, labels)
            return metrics["loss"]

        return _timed(step, lambda loss: float(loss), warmup, steps)
    optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.1, global_clipnorm=1.0)
    net.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    return _timed(lambda: net.train_on_batch(images, labels), lambda loss: float(loss), warmup, steps)


def _torch_device():
    """("cuda", a wait for the GPU) where torch sees one, else ("cpu", a no-op)."""
    import torch

    return ("cuda", torch.cuda.synchronize) if torch.cuda.is_available() else ("cpu", lambda: None)


def worker_torch(name, model, batch, options):
    image_size, dtype, warmup, steps = options.image_size, options.dtype, options.warmup, options.steps
    import timm
    import torch

    device, sync = _torch_device()
    net = timm.create_model(TIMM_NAMES[model], pretrained=False, num_classes=CLASSES, img_size=image_size).to(device)
    images, labels = _images(batch, image_size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(labels).to(device)
    if name.endswith("bf16 weights"):  # bf16 throughout, no autocast
        net, x = net.to(torch.bfloat16), x.to(torch.bfloat16)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16" and "weights" not in name)
    compiled = "compile" in name
    if "train" not in name:
        net.eval()
        forward = torch.compile(net) if compiled else net

        def infer():
            with torch.no_grad(), autocast:
                return forward(x)

        return _timed(infer, lambda out: (sync(), out.float().sum().item()), warmup, steps)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1, fused=device == "cuda")
    forward = torch.compile(net) if compiled else net

    def train():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        return loss

    return _timed(train, lambda loss: loss.item(), warmup, steps)


def worker_flax(name, model, batch, options):
    image_size, dtype, warmup, steps = options.image_size, options.dtype, options.warmup, options.steps
    import jax
    import jax.numpy as jnp
    import optax
    from flax_mixer import FlaxMixer  # this folder is on sys.path: compare.py runs as a script

    patch, width, blocks, tokens_hidden, channels_hidden = ARCHITECTURES[model]
    module = FlaxMixer(patch, width, blocks, tokens_hidden, channels_hidden, CLASSES)
    images, labels = _images(batch, image_size)
    x, y = jnp.asarray(images / 127.5 - 1), jnp.asarray(labels)
    params = module.init(jax.random.PRNGKey(0), x[:1])["params"]
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32

    def logits(params, x):  # mixed precision: float32 parameters, the compute in `compute`
        cast = jax.tree_util.tree_map(lambda p: p.astype(compute), params)
        return module.apply({"params": cast}, x.astype(compute)).astype(jnp.float32)

    if name == "flax jit":
        forward = jax.jit(logits)
        return _timed(lambda: forward(params, x), lambda out: out.block_until_ready(), warmup, steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))

    @jax.jit
    def train(params, state):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    carry = [params, optimizer.init(params)]

    def step():
        carry[0], carry[1], loss = train(*carry)
        return loss

    return _timed(step, lambda loss: float(loss), warmup, steps)


def worker_matmuls(framework, name, model, batch, options):
    """Seconds per step of only the model's matrix products (`matmuls`), in torch, XLA (JAX) or TF
    without XLA (the second operand a variable, or with "frozen" a constant of the graph)."""
    import numpy as np

    shapes = matmuls(model, options.image_size, batch, training=name.endswith("train"))
    rng = np.random.default_rng(0)
    kind = options.dtype
    operands = [
        (rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)) for m, k, n in shapes
    ]
    if framework == "tf":
        import tensorflow as tf

        cast = tf.bfloat16 if kind == "bfloat16" else tf.float32
        inputs = [tf.constant(a, cast) for a, _ in operands]
        weights = [
            tf.constant(b, cast) if name.endswith("frozen") else tf.Variable(tf.constant(b, cast)) for _, b in operands
        ]
        # Inputs are arguments, so no product can be folded at trace time. A call on the CPU
        # returns when its outputs are computed.
        products = tf.function(lambda inputs: [tf.matmul(a, b) for a, b in zip(inputs, weights)])
        return _timed(lambda: products(inputs), lambda out: out, options.warmup, options.steps)
    if framework == "torch":
        import torch

        device, sync = _torch_device()
        cast = dict(device=device, dtype=torch.bfloat16 if kind == "bfloat16" else torch.float32)
        operands = [(torch.from_numpy(a).to(**cast), torch.from_numpy(b).to(**cast)) for a, b in operands]
        return _timed(lambda: [a @ b for a, b in operands], lambda out: sync(), options.warmup, options.steps)
    import jax
    import jax.numpy as jnp

    operands = [(jnp.asarray(a, kind), jnp.asarray(b, kind)) for a, b in operands]
    products = jax.jit(lambda pairs: [a @ b for a, b in pairs])
    return _timed(lambda: products(operands), jax.block_until_ready, options.warmup, options.steps)


def worker_matmul(framework, dtype, repeats=10):
    """FLOP/s of an n^3 matmul, n = matmul_size() (the best of `repeats` timed calls after one
    warm-up)."""
    n = matmul_size()
    if framework == "torch":
        import torch

        device, sync = _torch_device()
        kind = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        a = torch.randn(n, n, device=device, dtype=kind)
        call, wait = (lambda: a @ a), (lambda out: (sync(), out))
    elif framework in ("tf", "tf_xla"):
        import tensorflow as tf

        a = tf.random.normal((n, n), dtype=tf.bfloat16 if dtype == "bfloat16" else tf.float32)
        matmul = tf.function(lambda a: tf.linalg.matmul(a, a), jit_compile=framework == "tf_xla")
        call, wait = (lambda: matmul(a)), (lambda out: out[0, 0].numpy())
    else:
        import jax
        import jax.numpy as jnp

        a = jnp.ones((n, n), jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        matmul = jax.jit(lambda a: a @ a)
        call, wait = (lambda: matmul(a)), (lambda out: out.block_until_ready())
    seconds = _timed(call, wait, 1, repeats)
    return 2 * n**3 / min(seconds)


WORKERS = {"tf": worker_tf, "jax": worker_jax, "torch": worker_torch, "flax": worker_flax}


def run_worker(args):
    if args.worker.startswith("matmul "):
        print(json.dumps(dict(flops=worker_matmul(args.worker.split()[1], args.dtype))))
        return
    framework, task = MEASUREMENTS[args.worker]
    batch = args.train_batch if task == "training" else args.batch
    for module in MODULES[framework]:
        __import__(module)
    baseline = _resident()
    worker = functools.partial(worker_matmuls, framework) if "matmuls only" in args.worker else WORKERS[framework]
    measured = worker(args.worker, args.model, batch, args)
    seconds, extra = measured if isinstance(measured, tuple) else (measured, {})
    print(json.dumps(dict(seconds=seconds, peak_memory=_peak_memory(framework, baseline), batch=batch, **extra)))


# --- the driver ---------------------------------------------------------------------------------------


def available(framework):
    """None when `framework`'s packages import here, else why not."""
    import importlib.util

    missing = [m for m in MODULES[framework] if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def _framework(engine):
    """The framework (process imports) of a matmul-rate engine."""
    return "tf" if engine == "tf_xla" else engine


def launch(args, worker, model):
    framework = _framework(worker.split()[1]) if worker.startswith("matmul ") else MEASUREMENTS[worker][0]
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # keeps carried packages
    env = dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="3")
    if framework in ("tf", "jax"):
        env["KERAS_BACKEND"] = "tensorflow" if framework == "tf" else "jax"
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        worker,
        "--model",
        model,
        "--batch",
        str(args.batch),
        "--train_batch",
        str(args.train_batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--image_size",
        str(args.image_size),
        "--dtype",
        args.dtype,
        "--expand_from",
        str(args.expand_from),
    ]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {args.timeout} s")
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        errors = [line for line in lines if "Error" in line.split(":")[0]]  # the exception's own line
        return dict(error=f"exit {result.returncode}: {(errors or lines)[-1][:300]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(args, progress=lambda runs, matmul, skipped: None):
    """Runs `args.rounds` rounds in alternating order; returns (runs {model: {name: [worker result
    per round]}}, matmul {framework: [FLOP/s per round]}, skipped {name: why}). `progress` gets the
    same three after every measurement."""
    names = [
        n
        for n in MEASUREMENTS
        if MEASUREMENTS[n][1] in args.tasks and (n in args.only or not args.only and n not in OPTIONAL)
    ]
    skipped = {n: why for n in names if (why := available(MEASUREMENTS[n][0]))}
    skipped.update({n: "the same as autocast in float32" for n in names if n in BF16_ONLY and args.dtype != "bfloat16"})
    matmul_frameworks = [e for e in ENGINES if not available(_framework(e))]
    runs = {model: {n: [] for n in names if n not in skipped} for model in args.models}
    matmul = {f: [] for f in matmul_frameworks}
    for round_ in range(args.rounds):
        order = [(m, n) for m in args.models for n in runs[m]]
        if round_ % 2:
            order.reverse()
        for framework in matmul_frameworks:
            result = launch(args, f"matmul {framework}", args.models[0])
            matmul[framework].append(result.get("flops"))
            print(f"round {round_ + 1}: matmul {framework}: {_gflops(result.get('flops'))}", flush=True)
        for model, name in order:
            result = launch(args, name, model)
            runs[model][name].append(result)
            shown = result.get("error") or f"{result['batch'] / statistics.median(result['seconds']):.2f} img/s"
            print(f"round {round_ + 1}: {model} {name}: {shown}", flush=True)
            progress(runs, matmul, skipped)
    return runs, matmul, skipped


def _gflops(flops):
    return f"{flops / 1e9:.0f} GFLOP/s" if flops else "failed"


# TF rows that XLA compiles; the trainers' own rows say in their result which way they went.
XLA_ROWS = ("keras_mixer tf xla", "keras_mixer tf trainers xla", "keras_mixer tf trainers fwd+bwd")


def engine(name, results=()):
    """The engine whose matrix products measurement `name` runs on: torch, tf (TF without XLA,
    oneDNN), tf_xla or jax (XLA)."""
    framework = MEASUREMENTS[name][0]
    if framework != "tf":
        return "jax" if framework in ("jax", "flax") else "torch"
    decided = [r["xla"] for r in results if "xla" in r]
    return "tf_xla" if (decided[0] if decided else name in XLA_ROWS) else "tf"


def summarise(args, runs, matmul, skipped):
    rates = {e: statistics.median(good) for e, values in matmul.items() if (good := [r for r in values if r])}
    machine = max(rates.values()) if rates else None  # the fastest engine's median
    rows = []
    for model, measured in runs.items():
        for name, results in measured.items():
            task = MEASUREMENTS[name][1]
            good = [r for r in results if "seconds" in r]
            row = dict(model=model, name=name, task=task, rounds=len(good), engine=engine(name, good))
            if not good:
                row["error"] = results[-1].get("error") if results else "not run"
            else:
                per_round = [r["batch"] / statistics.median(r["seconds"]) for r in good]
                row.update(
                    images_per_second=statistics.median(per_round),
                    per_round=per_round,
                    mean_per_round=[r["batch"] * len(r["seconds"]) / sum(r["seconds"]) for r in good],
                    batch=good[0]["batch"],
                    peak_memory=max(r["peak_memory"] for r in good),
                )
                expanded_from = args.expand_from if name.startswith("keras_mixer") else 0
                flops = forward_flops(model, args.image_size, expanded_from=expanded_from) * (
                    3 if task == "training" else 1
                )
                row["flops_per_image"] = flops
                rate = rates.get(row["engine"], machine)
                if rate:
                    row["matmul_share"] = row["images_per_second"] * flops / rate
            rows.append(row)
    timm_best = {}
    for row in rows:
        same = [r for r in rows if r["model"] == row["model"] and r["task"] == row["task"] and "images_per_second" in r]
        peers = [r["images_per_second"] for r in same if r["name"].split()[0] in PEERS]
        timm = max(
            (r for r in same if r["name"].startswith("timm")), key=lambda r: r["images_per_second"], default=None
        )
        if timm:
            timm_best[f"{row['model']} {row['task']}"] = dict(
                name=timm["name"], images_per_second=timm["images_per_second"]
            )
        if "images_per_second" in row:
            if peers:
                row["ratio_to_best_peer"] = row["images_per_second"] / max(peers)
            if timm:
                row["ratio_to_timm_best"] = row["images_per_second"] / timm["images_per_second"]
    return dict(
        machine=machine_name(),
        dtype=args.dtype,
        image_size=args.image_size,
        expand_from=args.expand_from,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        matmul_rate=machine,
        matmul_rates=rates,
        matmul_size=matmul_size(),
        matmul={f: v for f, v in matmul.items()},
        skipped=skipped,
        rows=rows,
        timm_best=timm_best,
        loop_costs=loop_costs(rows),
        command=shlex.join(["python", "benchmarks/compare.py", *sys.argv[1:]]),
    )


# A whole loop and the bare step it runs, on the same backend.
LOOP_STEPS = {"keras_mixer jax loop": "keras_mixer jax step", "keras_mixer tf loop": "keras_mixer tf trainers"}


def loop_costs(rows):
    """{"<model> <loop>": {step, cost, per_round}} for each loop measured beside its bare step: cost
    = 1 - loop img/s / the step's mean img/s, per round (the two ran next to each other), then the
    median over rounds. Rounds where either failed are left out."""
    found = {(r["model"], r["name"]): r for r in rows if "mean_per_round" in r}
    costs = {}
    for (model, name), loop in found.items():
        step = found.get((model, LOOP_STEPS.get(name)))
        if step is None or loop["rounds"] != step["rounds"]:
            continue
        per_round = [1 - a / b for a, b in zip(loop["per_round"], step["mean_per_round"])]
        costs[f"{model} {name}"] = dict(step=step["name"], cost=statistics.median(per_round), per_round=per_round)
    return costs


@functools.cache
def gpu_name():
    """The first NVIDIA GPU's name, or None (asked once per process)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def matmul_size():
    """2048 on a CPU; 8192 on a GPU, which smaller matmuls cannot fill."""
    return 8192 if gpu_name() else 2048


def machine_name():
    """ "2 CPU cores (Intel(R) Xeon(R) Processor; AMX-BF16, AMX-INT8, AVX512-BF16, AVX512-VNNI)", the
    GPU's name first where there is one."""
    import platform

    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    units = ", ".join(_package_file("model/cpu_units").matrix_features()) or "no bf16 or int8 matrix units"
    name = f"{os.cpu_count()} CPU cores ({cpu}; {units})"
    gpu = gpu_name()
    return f"{gpu}, {name}" if gpu else name


def markdown(summary):
    lines = [
        f"Machine: {summary['machine']}; {summary['dtype']}, {summary['image_size']}x{summary['image_size']}"
        + (f" (keras_mixer: expanded from {summary['expand_from']})" if summary["expand_from"] else "")
        + "; "
        f"median of {summary['rounds']} rounds of {summary['steps']} timed steps "
        f"after {summary['warmup']} warm-up steps.",
        f"Matmul rate per engine (median of n^3 matmuls, n = {summary['matmul_size']}): "
        + ", ".join(f"{ENGINE_NAMES[e]} {_gflops(r)}" for e, r in summary["matmul_rates"].items())
        + ".",
        f"Command: `{summary['command']}`",
        "",
        "| model | task | measurement | engine | batch | images/s | ÷ best peer | ÷ timm best "
        "| share of its engine's matmul rate | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        head = f"| {row['model']} | {row['task']} | {row['name']} | {ENGINE_NAMES[row['engine']]} |"
        if "error" in row:
            lines.append(f"{head} | failed: {row['error']} | | | | |")
            continue
        ratio, timm, share = (
            f"{row[k]:{f}}" if k in row else ""
            for k, f in (("ratio_to_best_peer", ".2f"), ("ratio_to_timm_best", ".2f"), ("matmul_share", ".0%"))
        )
        lines.append(
            f"{head} {row['batch']} | {row['images_per_second']:.2f} | {ratio} | {timm} | {share} | "
            f"{row['peak_memory'] / 2**20:.0f} |"
        )
    for key, best in summary.get("timm_best", {}).items():
        lines.append(f"\ntimm best, {key}: {best['name']}, {best['images_per_second']:.2f} img/s.")
    for key, cost in summary.get("loop_costs", {}).items():
        rounds = ", ".join(f"{c:+.1%}" for c in cost["per_round"])
        lines.append(
            f"\n{key} costs {cost['cost']:+.1%} of {cost['step']}'s mean img/s (median over rounds: {rounds}): "
            "its input and bookkeeping."
        )
    for name, why in summary["skipped"].items():
        lines.append(f"\nSkipped {name}: {why}.")
    return "\n".join(lines) + "\n"


def summary_markdown(summary):
    """One row per measurement, one column per (model, task): "images/s (÷ best peer, share of its
    engine's matmul rate)", the fastest peer-or-keras_mixer figure of each column in bold, under a
    line naming the machine, precision and command. The form the docs' pages include."""
    columns = list(dict.fromkeys((r["model"], r["task"]) for r in summary["rows"]))
    names = list(dict.fromkeys(r["name"] for r in summary["rows"]))
    cells = {(r["name"], r["model"], r["task"]): r for r in summary["rows"]}
    best = {
        column: max(
            (
                r["images_per_second"]
                for r in summary["rows"]
                if (r["model"], r["task"]) == column and "images_per_second" in r and "matmuls only" not in r["name"]
            ),
            default=None,
        )
        for column in columns
    }

    def cell(name, column):
        row = cells.get((name, *column))
        if row is None:
            return ""
        if "images_per_second" not in row:
            return "failed"
        notes = [f"{row['ratio_to_best_peer']:.2f}×"] if "ratio_to_best_peer" in row else []
        notes += [f"{row['matmul_share']:.0%}"] if "matmul_share" in row else []
        rate = row["images_per_second"]
        text = f"{rate:,.0f}" if rate >= 1000 else f"{rate:.1f}" if rate >= 100 else f"{rate:.2f}"
        text += f" ({', '.join(notes)})" if notes else ""
        return f"**{text}**" if row["images_per_second"] == best[column] and "matmuls only" not in name else text

    lines = [
        f"{summary['machine']}; {summary['dtype']}, {summary['image_size']}², medians of {summary['rounds']} "
        f"rounds. Images/s (÷ best peer, share of the row's engine's matmul rate). "
        f"Command: `{summary['command']}`",
        "",
        "| measurement | " + " | ".join(f"{model} {task}" for model, task in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    lines += [f"| {name} | " + " | ".join(cell(name, c) for c in columns) + " |" for name in names]
    return "\n".join(lines) + "\n"


def write_tables(summary, folder):
    """compare.json, compare.md and summary.md in `folder`, each replaced whole (a reader never
    sees half a file)."""
    texts = (
        ("compare.json", json.dumps(summary, indent=1)),
        ("compare.md", markdown(summary)),
        ("summary.md", summary_markdown(summary)),
    )
    for name, text in texts:
        with open(os.path.join(folder, name + ".part"), "w") as f:
            f.write(text)
        os.replace(os.path.join(folder, name + ".part"), os.path.join(folder, name))


def _colour(name):
    """keras_mixer blue, peers grey, the matmul-only ceilings white."""
    if name.startswith("keras_mixer"):
        return "tab:blue"
    return "white" if "matmuls only" in name else "tab:gray"


def chart(summary, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = sorted({(r["model"], r["task"]) for r in summary["rows"]})
    figure = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    for ax, (model, task) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        rows = [r for r in summary["rows"] if (r["model"], r["task"]) == (model, task) and "images_per_second" in r]
        colours = [_colour(r["name"]) for r in rows]
        ax.barh([r["name"] for r in rows], [r["images_per_second"] for r in rows], color=colours, edgecolor="black")
        ax.invert_yaxis()
        ax.set_title(f"{model} {task}")
        ax.set_xlabel("images/s")
    figure.suptitle(f"{summary['machine']}, {summary['dtype']}")
    figure.savefig(path, format="png", dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="B/16,S/16")
    parser.add_argument("--tasks", default="inference,training")
    parser.add_argument("--only", default="", help="comma-separated measurement names (default: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="inference batch")
    parser.add_argument("--train_batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--expand_from",
        type=int,
        default=0,
        help="keras_mixer's models are built at this side and moved to --image_size by the block-diagonal expansion",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one measurement may take")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--render", nargs="+", metavar="DIR", help="write DIR/summary.md from its compare.json")
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    if args.render:
        for folder in args.render:
            with open(os.path.join(folder, "compare.json")) as f:
                summary = json.load(f)
            with open(os.path.join(folder, "summary.md"), "w") as f:
                f.write(summary_markdown(summary))
        return None
    args.models = args.models.split(",")
    args.tasks = args.tasks.split(",")
    args.only = [n for n in args.only.split(",") if n]
    unknown = [m for m in args.models if m not in ARCHITECTURES] + [n for n in args.only if n not in MEASUREMENTS]
    if unknown:
        parser.error(
            f"unknown {', '.join(map(repr, unknown))}; models: {', '.join(ARCHITECTURES)}; "
            f"measurements: {', '.join(MEASUREMENTS)}"
        )
    os.makedirs(args.out, exist_ok=True)

    def write(*measured):
        summary = summarise(args, *measured)
        write_tables(summary, args.out)
        return summary

    summary = write(*measure(args, progress=write))
    chart(summary, os.path.join(args.out, "compare.png"))
    print(markdown(summary))


if __name__ == "__main__":
    main()
