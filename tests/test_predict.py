"""predict.py: labelling image files and folders with a trained model, as the serving signature
prepares them; a file it cannot read is named and skipped."""

import csv
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from runs import trainer

from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.serving import label_files


def _set(root, classes=("circle", "square"), per_class=12, side=24):
    """A two-class folder set of drawn shapes (train and test), easy enough to learn in a few steps."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    for split in ("train", "test"):
        for k, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                cy, cx, r = rng.integers(8, side - 8, 2).tolist() + [int(rng.integers(4, 7))]
                circle = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                inside = circle if k == 0 else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
                pixels = np.where(inside, 230, 25).astype(np.uint8) + rng.integers(0, 20, (side, side), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data root, workdir) of 40 steps on the shapes, with its export."""
    base = tmp_path_factory.mktemp("predict")
    root = _set(base / "shapes")
    workdir = str(base / "run")
    trainer("pretrain", "--dataset", f"folder:{root}", "--steps", "40", "--workdir", workdir, "--seed", "0")
    return root, workdir


def _rows(result):
    return list(csv.DictReader(io.StringIO(result.stdout)))


def test_its_top1_on_a_labelled_split_is_evaluates(trained):
    root, workdir = trained
    evaluated = trainer("evaluate", "--source", workdir, "--dataset", f"folder:{root}", "--split", "test")
    top1 = float(re.search(r"top-1: ([0-9.]+)", evaluated.stdout).group(1))
    rows = _rows(trainer("predict", "--source", workdir, "--format", "csv", os.path.join(root, "test")))
    assert len(rows) == 24  # every test image, recursively
    right = [r["label_1"] == os.path.basename(os.path.dirname(r["path"])) for r in rows]
    assert np.mean(right) == pytest.approx(top1, abs=1e-4)
    assert top1 > 0.6  # it learned something, so equal top-1s are not both chance
    # The export, run through its bytes signature as TF Serving runs it, labels them alike.
    exported = _rows(trainer("predict", "--source", os.path.join(workdir, "export"), "--format", "csv", root + "/test"))
    assert [r["label_1"] for r in exported] == [r["label_1"] for r in rows]
    scores = np.array([[float(r[f"score_{i}"]) for i in (1, 2)] for r in rows])
    assert np.allclose(scores.sum(1), 1, atol=1e-5) and (scores[:, 0] >= scores[:, 1]).all()


def test_files_it_cannot_read_are_named_and_skipped(trained, tmp_path):
    root, workdir = trained
    folder = tmp_path / "mixed"
    os.makedirs(folder / "deeper")
    good = [shutil.copy(os.path.join(root, "test", "circle", f"{i}.png"), folder / "deeper") for i in (0, 1)]
    (folder / "notes.txt").write_text("not an image")
    data = open(good[0], "rb").read()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    huge = bytearray(data)
    huge[16:24] = (30000).to_bytes(4, "big") * 2  # the header declares 30000 x 30000 pixels
    (folder / "huge.png").write_bytes(bytes(huge))
    (folder / ".hidden.png").write_bytes(data)  # hidden files are not looked at
    result = trainer("predict", "--source", workdir, str(folder), str(tmp_path / "absent.png"), check=False)
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in good]
    assert re.fullmatch(r"\S+\t(circle|square) [01]\.\d{4}  (circle|square) [01]\.\d{4}", lines[0])
    errors = result.stderr.splitlines()
    expected = {
        "absent.png": "no such file or folder",
        "huge.png": "image of 30000x30000 pixels (width x height) is over the pixel budget of 40000000 pixels",
        "notes.txt": "not a JPEG or PNG image",
        "truncated.png": "does not decode",
    }
    for name, reason in expected.items():
        assert any(line.startswith("skipped: ") and name in line and reason in line for line in errors), (name, errors)
    assert errors[-1] == "4 of 6 files skipped"
    # JSON lines, and the top-k capped at the class count.
    out = trainer("predict", "--source", workdir, "--format", "json", "--top_k", "9", *map(str, good)).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in good]
    assert [len(r["top"]) for r in records] == [2, 2]
    assert {t["label"] for t in records[0]["top"]} == {"circle", "square"}


def test_without_tensorflow_the_decode_equals_the_serving_one(tmp_path):
    rng = np.random.default_rng(1)
    sizes = [(24, 24), (30, 17), (9, 40)]
    preprocessing = EvalPreprocessing("crop", 0.9)
    served = label_files.tensorflow_decoder((16, 16), preprocessing, max_pixels=1000)
    pillow = label_files.pillow_decoder((16, 16), preprocessing, max_pixels=1000)
    for h, w in sizes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
        assert np.array_equal(served(buffer.getvalue()), pillow(buffer.getvalue()))
    too_big = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(too_big, "PNG")
    for decode in (served, pillow):
        with pytest.raises(ValueError, match="image of 40x40 pixels .* over the pixel budget of 1000"):
            decode(too_big.getvalue())
        with pytest.raises(ValueError, match="not a JPEG or PNG"):
            decode(b"GIF89a....")


def _photos():
    """{name: encoded bytes} of real photographs: scikit-image's bundled files as they ship (JPEGs
    with EXIF and other segments before the frame, hubble_deep_field.jpg's 15 KB of them; non-square
    ones; a greyscale PNG) and its astronaut [512, 512, 3] saved as PNG, as a baseline JPEG (SOF0)
    and as a progressive one (SOF2)."""
    skimage_data = pytest.importorskip("skimage.data")
    folder = os.path.dirname(skimage_data.__file__)
    photos = {}
    for name in ("hubble_deep_field.jpg", "retina.jpg", "rocket.jpg", "camera.png", "coffee.png"):
        with open(os.path.join(folder, name), "rb") as f:
            photos[name] = f.read()
    saved_as = {"astronaut.png": dict(format="PNG"), "astronaut.jpg": dict(format="JPEG")}
    saved_as["astronaut_progressive.jpg"] = dict(format="JPEG", progressive=True)
    for name, options in saved_as.items():
        buffer = io.BytesIO()
        Image.fromarray(skimage_data.astronaut()).save(buffer, **options)
        photos[name] = buffer.getvalue()
    return photos


def _served_header_size():
    """The served graph's header reader (`export.header_size`), traced as the SavedModel runs it:
    bytes -> (height, width), or InvalidArgumentError."""
    import tensorflow as tf

    from keras_mixer.serving.export import header_size

    traced = tf.function(header_size, input_signature=[tf.TensorSpec([], tf.string)])
    return lambda data: tuple(int(side) for side in traced(tf.constant(data)))


def test_the_header_size_is_the_decoded_size_in_python_and_in_the_served_graph():
    """The budget is checked on the header's size, so it must be the size the pixels decode to, in
    both readers: Python's (predict.py, with or without TensorFlow) and the SavedModel's."""
    from keras_mixer.serving.image_headers import header_size

    served, sizes = _served_header_size(), {}
    for name, data in _photos().items():
        with Image.open(io.BytesIO(data)) as image:
            decoded = np.asarray(image).shape[:2]
        sizes[name] = header_size(data)
        assert sizes[name] == served(data) == decoded, name
    assert sizes["hubble_deep_field.jpg"] == (872, 1000) and sizes["rocket.jpg"] == (427, 640)  # height first


def test_a_truncated_or_foreign_header_is_refused_in_one_line_by_every_reader():
    import tensorflow as tf

    photos = _photos()
    png, jpeg = photos["astronaut.png"], photos["astronaut_progressive.jpg"]
    refused = {  # bytes: (the reason predict.py gives, the reason in the served graph's error)
        png[:20]: ("truncated PNG: no complete IHDR header",) * 2,  # the IHDR's height cut off
        jpeg[: jpeg.index(b"\xff\xc2")]: ("not a readable JPEG (", "Invalid JPEG data"),  # cut before the frame
        b"GIF89a" + png[6:]: ("not a JPEG or PNG image",) * 2,
    }
    preprocessing = EvalPreprocessing("crop", 0.9)
    decoders = [
        make((16, 16), preprocessing, 10**6) for make in (label_files.tensorflow_decoder, label_files.pillow_decoder)
    ]
    served = _served_header_size()
    for data, (reason, served_reason) in refused.items():
        for decode in decoders:
            with pytest.raises(ValueError) as caught:
                decode(data)
            assert str(caught.value).startswith(reason) and "\n" not in str(caught.value), (reason, decode)
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(served_reason)):
            served(data)
