"""Choosing and creating the tf.distribute strategy.

`choose_strategy` is pure (tested on its own); `make_strategy` only calls TensorFlow.
"""

import json
import logging

import tensorflow as tf

log = logging.getLogger("keras_mixer")


def cluster_workers(tf_config):
    """Number of worker tasks (chief included) in a TF_CONFIG JSON string ('' or None: 0)."""
    if not tf_config:
        return 0
    try:
        cluster = json.loads(tf_config).get("cluster", {})
    except json.JSONDecodeError:
        raise ValueError(f"TF_CONFIG is not valid JSON: {tf_config[:200]!r}") from None
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def choose_strategy(name, tpu=None, tf_config=None, num_gpus=0):
    """The strategy kind for the `--strategy` flag value and the environment.

    "auto": `--tpu` -> "tpu"; TF_CONFIG with several workers -> "multi_worker"; several local
    GPUs -> "mirrored"; else "default". Any other name is taken as asked.
    """
    if name != "auto":
        return name
    if tpu is not None:
        return "tpu"
    if cluster_workers(tf_config) > 1:
        return "multi_worker"
    if num_gpus > 1:
        return "mirrored"
    return "default"


def make_strategy(kind, tpu=None):
    """Creates the strategy. For "tpu", `tpu` is a TPU name or address; "local" (bare `--tpu`) is
    the TPU VM this process runs on."""
    if kind == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "local")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if kind == "default":
        return tf.distribute.get_strategy()
    raise ValueError(f"unknown strategy {kind!r}")


def is_chief(strategy):
    """True on the one worker that writes checkpoints, logs and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (
        task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
    )


def task_id(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return getattr(resolver, "task_id", 0) or 0


def replica_devices(strategy):
    """The devices this worker's replicas run on ("/job:localhost/replica:0/task:0/device:CPU:0", ...);
    the default strategy's one device is the first GPU, else the CPU."""
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list: TF places on the first GPU, else the CPU
        gpus = tf.config.list_logical_devices("GPU")
        return [gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name]
