"""The speed benchmark's arithmetic: FLOPs per image, ratios to the best peer, shares of the matmul rate."""

import os
import sys
from types import SimpleNamespace

import pytest
from runs import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import compare  # noqa: E402


@pytest.mark.parametrize("variant, image_size", [("S/16", 224), ("B/16", 448)])
def test_forward_flops_count_every_multiply_add_of_the_built_model(variant, image_size):
    # Counted independently from the Keras model's kernels: a Dense kernel [n_in, n_out] applied to
    # m rows costs m * n_in * n_out multiply-adds; the stem is one such kernel per token.
    import keras_mixer

    model = keras_mixer.create_model(variant, input_shape=(image_size, image_size, 3), classes=1000)
    tokens, width = model.get_layer("MixerBlock_0").output.shape[1:]
    macs = 0
    for variable in model.weights:
        if not variable.path.endswith("kernel"):
            continue
        shape = variable.shape
        if variable.path.startswith("stem"):
            macs += tokens * shape[0] * shape[1] * shape[2] * shape[3]
        elif "token_mixing" in variable.path:
            macs += width * shape[0] * shape[1]
        elif "channel_mixing" in variable.path:
            macs += tokens * shape[0] * shape[1]
        else:  # the head, once per image
            macs += shape[0] * shape[1]
    assert compare.forward_flops(variant, image_size) == 2 * macs


@pytest.mark.parametrize("variant, image_size, batch", [("S/16", 224, 3), ("B/16", 448, 2)])
def test_the_matmul_ceiling_times_exactly_the_models_products(variant, image_size, batch):
    # The "matmuls only" rows are a ceiling only if they do the model's multiply-adds, no fewer.
    for training, passes in ((False, 1), (True, 3)):
        shapes = compare.matmuls(variant, image_size, batch, training)
        assert 2 * sum(m * k * n for m, k, n in shapes) == passes * batch * compare.forward_flops(variant, image_size)


def test_the_expanded_model_costs_its_wider_token_mlp():
    # B/16 moved from 224 to 448: 4 copies, D_S 384 -> 1536, computed densely.
    plain, expanded = compare.forward_flops("B/16", 448), compare.forward_flops("B/16", 448, expanded_from=224)
    assert expanded - plain == 2 * 12 * 2 * 768 * 784 * (1536 - 384)


def _result(images_per_second, batch=16, memory=2**30):
    return dict(seconds=[batch / images_per_second] * 3, batch=batch, peak_memory=memory)


def test_the_summary_divides_by_the_best_peer_the_best_timm_and_each_rows_own_engine():
    args = SimpleNamespace(image_size=224, expand_from=0, dtype="bfloat16", steps=3, warmup=1, rounds=2)
    runs = {
        "B/16": {
            "keras_mixer tf xla": [_result(4.0), _result(6.0)],  # median over rounds: 5
            "keras_mixer tf frozen": [_result(8.0), _result(8.0)],
            "timm eager": [_result(2.0), _result(2.0)],
            "timm eager bf16 weights": [_result(3.0), _result(3.0)],
            "flax jit": [_result(4.0), _result(4.0)],
            "keras_mixer tf trainers": [dict(_result(1.5), xla=False)] * 2,  # the step said it ran without XLA
            "keras_mixer tf loop": [dict(error="exit 1: ValueError: x")] * 2,
            "flax optax": [_result(1.0), _result(1.0)],
        }
    }
    # Medians: torch 110, TF 300, TF+XLA 90, JAX 80 GFLOP/s.
    matmul = {"torch": [100e9, 120e9, 110e9], "tf": [300e9] * 3, "tf_xla": [90e9] * 3, "jax": [80e9, 95e9, 70e9]}
    summary = compare.summarise(args, runs, matmul, skipped={})
    rows = {r["name"]: r for r in summary["rows"]}
    flops = compare.forward_flops("B/16", 224)
    assert summary["matmul_rate"] == 300e9 and summary["matmul_rates"]["tf_xla"] == 90e9
    assert rows["keras_mixer tf xla"]["images_per_second"] == pytest.approx(5.0)
    assert rows["keras_mixer tf xla"]["ratio_to_best_peer"] == pytest.approx(5.0 / 4.0)  # flax is the best peer
    assert rows["keras_mixer tf frozen"]["ratio_to_timm_best"] == pytest.approx(8.0 / 3.0)  # timm's bf16 weights
    assert summary["timm_best"]["B/16 inference"] == dict(name="timm eager bf16 weights", images_per_second=3.0)
    assert rows["timm eager"]["ratio_to_best_peer"] == pytest.approx(0.5)
    # Each row against its own engine's matmul rate.
    assert rows["keras_mixer tf xla"]["matmul_share"] == pytest.approx(5.0 * flops / 90e9)
    assert rows["keras_mixer tf frozen"]["matmul_share"] == pytest.approx(8.0 * flops / 300e9)
    assert rows["timm eager"]["matmul_share"] == pytest.approx(2.0 * flops / 110e9)
    assert rows["keras_mixer tf trainers"]["engine"] == "tf"
    assert rows["keras_mixer tf trainers"]["matmul_share"] == pytest.approx(1.5 * 3 * flops / 300e9)
    assert rows["flax optax"]["matmul_share"] == pytest.approx(3 * flops / 80e9)
    assert rows["keras_mixer tf loop"]["error"] == "exit 1: ValueError: x"
    table = compare.markdown(summary)
    assert "| B/16 | inference | keras_mixer tf xla | TF+XLA | 16 | 5.00 | 1.25 | 1.67 |" in table
    assert "failed: exit 1: ValueError: x" in table
    assert "timm best, B/16 inference: timm eager bf16 weights, 3.00 img/s." in table
    pivot = compare.summary_markdown(summary).splitlines()
    assert pivot[2] == "| measurement | B/16 inference | B/16 training |"
    assert "| keras_mixer tf frozen | **8.00 (2.00×, " in pivot[5]  # the column's fastest in bold
    assert "| keras_mixer tf xla | 5.00 (1.25×, " in pivot[4]
    assert pivot[-2] == "| keras_mixer tf loop |  | failed |"


def test_each_speed_table_the_docs_include_is_its_runs_json_rendered():
    # The docs' pages include DIR/summary.md; nobody edits one by hand: it is what its JSON renders to.
    import glob
    import json

    found = glob.glob(os.path.join(ROOT, "docs", "speed", "**", "compare.json"), recursive=True)
    folders = sorted(os.path.dirname(path) for path in found)
    assert len(folders) >= 10
    for folder in folders:
        with open(os.path.join(folder, "compare.json")) as f:
            expected = compare.summary_markdown(json.load(f))
        with open(os.path.join(folder, "summary.md")) as f:
            assert f.read() == expected, f"{folder}/summary.md: run python benchmarks/compare.py --render {folder}"
    with open(os.path.join(ROOT, "docs", "speed.md")) as f:
        included = [line.split('"')[1] for line in f if line.startswith("--8<--")]
    assert included and all(os.path.isfile(os.path.join(ROOT, "docs", name)) for name in included)


def test_the_machine_is_named_with_its_cpus_matrix_units():
    from keras_mixer.model import cpu_units

    name = compare.machine_name()
    units = cpu_units.matrix_features()
    assert f"{os.cpu_count()} CPU cores (" in name
    assert (", ".join(units) if units else "no bf16 or int8 matrix units") in name


def test_a_measurement_past_its_timeout_is_stopped_and_listed_as_failed():
    # A worker that hangs (here: any real measurement given 1 s) must not stall the whole run.
    args = SimpleNamespace(
        batch=1, train_batch=1, steps=1, warmup=0, image_size=224, dtype="float32", expand_from=0, timeout=1
    )
    assert compare.launch(args, "flax jit", "B/16") == dict(error="timed out after 1 s")


def test_a_loop_is_set_against_its_steps_mean_rate_round_by_round():
    # A bare step of 1 s with one 3 s outlier in round 1: median rate 16 img/s, mean 16 / 1.5.
    step = [
        dict(seconds=[1.0, 1.0, 1.0, 3.0], batch=16, peak_memory=0),
        dict(seconds=[2.0] * 4, batch=16, peak_memory=0),
    ]
    loop = [dict(seconds=[16 / 10.0], batch=16, peak_memory=0), dict(seconds=[16 / 7.6], batch=16, peak_memory=0)]
    args = SimpleNamespace(image_size=64, expand_from=0, dtype="float32", steps=4, warmup=1, rounds=2)
    summary = compare.summarise(args, {"S/16": {"keras_mixer jax step": step, "keras_mixer jax loop": loop}}, {}, {})
    cost = summary["loop_costs"]["S/16 keras_mixer jax loop"]
    # Round 1: 1 - 10 / (16 / 1.5); round 2: 1 - 7.6 / 8. A median step would make round 1 cost 37.5 %.
    assert cost["step"] == "keras_mixer jax step"
    assert cost["per_round"] == pytest.approx([1 - 10 / (16 / 1.5), 1 - 7.6 / 8])
    assert cost["cost"] == pytest.approx((0.0625 + 0.05) / 2)
    assert "S/16 keras_mixer jax loop costs +5.6% of keras_mixer jax step's mean img/s" in compare.markdown(summary)
