"""Choosing and creating the tf.distribute strategy.

`choose_strategy` is pure (tested on its own); `make_strategy` only calls TensorFlow.
"""

import logging

import tensorflow as tf

from keras_mixer.training.tf.cluster import check_this_host, read_tf_config, wait_for_peers

log = logging.getLogger("keras_mixer")


def choose_strategy(name, tpu=None, tf_config=None, num_gpus=0):
    """The strategy kind for the `--strategy` flag value and the environment.

    "auto": `--tpu` -> "tpu"; TF_CONFIG with several workers -> "multi_worker"; several local
    GPUs -> "mirrored"; else "default". Any other name is taken as asked.
    """
    if name != "auto":
        return name
    if tpu is not None:
        return "tpu"
    cluster = read_tf_config(tf_config)
    if cluster is not None and cluster.size > 1:
        return "multi_worker"
    if num_gpus > 1:
        return "mirrored"
    return "default"


def make_strategy(kind, tpu=None, tf_config=None, cluster_timeout=900):
    """Creates the strategy. For "tpu", `tpu` is a TPU name or address; "local" (bare `--tpu`) is
    the TPU VM this process runs on. For "multi_worker" with a `tf_config` cluster, this task's
    address is checked first, then the workers are waited for (`cluster.wait_for_peers`) for at most
    `cluster_timeout` seconds."""
    if kind == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "local")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if kind == "multi_worker":
        cluster = read_tf_config(tf_config)
        if cluster is None or cluster.size == 1:
            return tf.distribute.MultiWorkerMirroredStrategy()
        check_this_host(cluster)
        wait_for_peers(cluster, cluster_timeout)
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
