"""Models on the hubs: `hf://org/name[@revision]` (the Hugging Face Hub) and
`kaggle://owner/model/keras/variant[/version]` (Kaggle Models), fetched by their own clients
(huggingface_hub, kagglehub: `pip install "keras_mixer[hub]"`) into those clients' caches, and a
preset folder uploaded with their own calls.

A repo holds a keras-hub preset folder (`keras_mixer.weights_io.preset_folders`) or a timm model
(`keras_mixer.weights_io.timm_repos`); `fetch` returns the local folder either way. Offline
(`HF_HUB_OFFLINE=1`), a Hugging Face repo loads from the cache, and a miss names the repo, the cache
folder and the variable. Kaggle needs a version number to load from its cache without asking Kaggle.
No Keras here.
"""

import json
import os

from keras_mixer.weights_io import preset_folders, timm_repos

HF, KAGGLE = "hf://", "kaggle://"


class HubUnavailable(OSError):
    """A hub model could not be fetched; the message says what to do."""


def is_hub_uri(source):
    return isinstance(source, str) and source.startswith((HF, KAGGLE))


def fetch(uri):
    """The local folder holding the files of hub model `uri` (downloaded into the client's cache,
    or found there)."""
    if uri.startswith(HF):
        return _fetch_hf(uri)
    if uri.startswith(KAGGLE):
        return _fetch_kaggle(uri)
    raise ValueError(f"{uri!r} is not a hub model: give hf://org/name[@revision] or kaggle://owner/model/keras/variant")


def _client(name):
    try:
        return __import__(name)
    except ImportError:
        raise HubUnavailable(f'{name} is needed for hub models: pip install "keras_mixer[hub]"') from None


def parse_hf(uri):
    """ "hf://org/name@revision" -> ("org/name", "revision" or None), ValueError naming the form."""
    repo, _, revision = uri[len(HF) :].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{uri!r} is not a Hugging Face model: give hf://org/name or hf://org/name@revision")
    return repo, revision or None


def _fetch_hf(uri):
    hub = _client("huggingface_hub")
    from huggingface_hub import constants, errors

    repo, revision = parse_hf(uri)

    def download(filename):
        try:
            return hub.hf_hub_download(repo, filename, revision=revision)
        except errors.RevisionNotFoundError:
            raise ValueError(f"{uri}: revision {revision!r} does not exist in {repo}") from None
        except errors.RepositoryNotFoundError:
            raise ValueError(f"{uri}: no such repo on the Hugging Face Hub (or it is private)") from None
        except errors.LocalEntryNotFoundError:
            if not constants.HF_HUB_OFFLINE:
                raise HubUnavailable(
                    f"{uri}: {filename} could not be downloaded (no connection to the Hugging Face Hub?) and is not "
                    f"in the cache {constants.HF_HUB_CACHE}"
                ) from None
            cached = _cached_revisions(constants.HF_HUB_CACHE, repo)
            raise HubUnavailable(
                f"{uri}: {filename} at revision {revision or 'main'} is not in the Hugging Face cache "
                f"{constants.HF_HUB_CACHE} (cached revisions: {', '.join(cached) or 'none'}), and HF_HUB_OFFLINE=1 "
                f"forbids downloading it: unset HF_HUB_OFFLINE once, or set HF_HUB_CACHE to the cache that holds it"
            ) from None
        except errors.EntryNotFoundError:
            raise FileNotFoundError(f"{uri}: the repo has no {filename}") from None

    config = download(timm_repos.CONFIG)
    folder = os.path.dirname(config)
    try:
        with open(config, encoding="utf-8") as f:
            is_timm = "architecture" in json.load(f)
    except ValueError as e:
        raise ValueError(f"{uri}: its config.json is not valid JSON ({e})") from None
    for filename in timm_repos.WEIGHTS[:1] if is_timm else preset_folders.FILES[1:]:
        download(filename)
    return folder


def _cached_revisions(cache, repo):
    refs = os.path.join(cache, f"models--{repo.replace('/', '--')}", "refs")
    return sorted(os.listdir(refs)) if os.path.isdir(refs) else []


def parse_kaggle(uri):
    """ "kaggle://owner/model/keras/variant[/version]" -> the kagglehub handle, ValueError naming the form."""
    handle = uri[len(KAGGLE) :]
    parts = handle.split("/")
    if len(parts) not in (4, 5) or not all(parts) or (len(parts) == 5 and not parts[4].isdigit()):
        raise ValueError(f"{uri!r} is not a Kaggle model: give kaggle://owner/model/keras/variant[/version]")
    return handle


def _fetch_kaggle(uri):
    kagglehub = _client("kagglehub")
    handle = parse_kaggle(uri)
    try:
        return kagglehub.model_download(handle)
    except Exception as e:  # kagglehub raises its own HTTP, credential and connection errors
        from kagglehub.config import get_cache_folder

        versioned = (
            ""
            if handle.count("/") == 4
            else " (a version number, kaggle://.../variant/1, loads a cached model without asking Kaggle)"
        )
        reason = " ".join(str(e).split())[:200]
        raise HubUnavailable(
            f"{uri}: kagglehub could not fetch it ({type(e).__name__}: {reason}); its cache is "
            f"{get_cache_folder()} (KAGGLEHUB_CACHE){versioned}"
        ) from None


def model_card(folder):
    """README.md text for a preset folder: the variant, what it was trained on and its top-1."""
    metadata = preset_folders.read_metadata(folder)
    record = metadata.get("trained_on") or {}
    with open(os.path.join(folder, preset_folders.CONFIG), encoding="utf-8") as f:
        config = json.load(f)["config"]
    from keras_mixer.model.variants import variant_of

    variant = record.get("model") or variant_of(config) or "a custom Mixer"
    lines = [
        "---",
        "library_name: keras",
        "tags: [keras, keras-hub, keras_mixer, mlp-mixer, image-classification]",
        "---",
        f"# MLP-Mixer {variant}",
        "",
        "An MLP-Mixer (Tolstikhin et al. 2021) saved as a keras-hub preset folder by keras_mixer "
        f"{metadata.get('keras_mixer_version')} (Keras {metadata.get('keras_version')}); "
        f"{metadata.get('parameter_count')} parameters.",
        "",
        f"- Variant: {variant}, input {config.get('input_shape')}, {config.get('classes')} classes",
        f"- Trained on: {record.get('dataset') or 'not recorded'}"
        + (f" (step {record['step']})" if record.get("step") is not None else ""),
        f"- Top-1: {metadata['top1']:.4f} on its evaluation split"
        if metadata.get("top1") is not None
        else "- Top-1: not recorded",
        f"- Evaluation: {record.get('eval_resize', 'crop')} at crop ratio {record.get('crop_ratio', 0.875)}, "
        f"{record.get('interpolation', 'bilinear')}",
        "",
        "```python",
        "import keras_mixer",
        'model = keras_mixer.MlpMixer.from_preset("<this repo\'s hf:// or kaggle:// name>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def upload_preset(uri, folder):
    """Uploads preset folder `folder` to `uri` (hf://org/name or kaggle://owner/model/keras/variant)
    with the clients' own calls, after checking it loads: huggingface_hub's `create_repo` and
    `upload_folder`, or kagglehub's `model_upload`. A README.md model card is written into the
    folder first where it has none."""
    folder = os.fspath(folder)
    preset_folders.load_model(folder)  # a folder that does not load is refused before any upload
    card = os.path.join(folder, "README.md")
    if not os.path.exists(card):
        with open(card, "w", encoding="utf-8") as f:
            f.write(model_card(folder))
    if uri.startswith(HF):
        repo, revision = parse_hf(uri)
        if revision:
            raise ValueError(f"{uri}: an upload goes to a repo, not a revision (drop @{revision})")
        hub = _client("huggingface_hub")
        repo_id = hub.create_repo(repo, exist_ok=True).repo_id
        return hub.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="keras_mixer preset")
    if uri.startswith(KAGGLE):
        handle = parse_kaggle(uri)
        if handle.count("/") == 4:
            raise ValueError(f"{uri}: an upload makes a new version; give the handle without one")
        return _client("kagglehub").model_upload(handle, folder, version_notes="keras_mixer preset")
    raise ValueError(f"{uri!r}: upload to hf://org/name or kaggle://owner/model/keras/variant")
