"""`trainers/visualize.py`: the token-mixing pictures of paper section 3.5 (Fig. 5) for any Mixer.

    python trainers/visualize.py --source /tmp/demo_wd --out tokens.png

Writes the PNG and `tokens.json` beside it (per block: the grid, the units drawn, the opposite-phase
pairs with their cosines). The user's errors end with one `error: ...` line and exit code 1, as
in the training commands (`keras_mixer.programs.command_lines`).
"""

import os

from absl import flags

from keras_mixer.programs.command_lines import SOURCE_MODEL_HELP, define_model_flag, run_program, user_errors
from keras_mixer.studies.token_pictures import DEFAULT_BLOCKS, SCALES

FLAGS = flags.FLAGS


def _define():
    flags.DEFINE_string(
        "source", None, "A .keras file, a training workdir or checkpoint, a preset name or a weights file (.npz, timm)."
    )
    flags.DEFINE_string("out", "tokens.png", "The PNG to write; the JSON sidecar goes beside it (same name, .json).")
    flags.DEFINE_list(
        "blocks",
        [str(b) for b in DEFAULT_BLOCKS],
        "Block indices to draw, from 0 (the default list is cut to the model's depth; an explicit one is not).",
    )
    flags.DEFINE_integer(
        "units", None, "Units drawn per block, the first in pairing order (default: all).", lower_bound=1
    )
    flags.DEFINE_enum("scale", "unit", list(SCALES), "Colour limits: each unit's own max |w|, or one per block.")
    flags.DEFINE_float(
        "pair_below",
        None,
        "Two units are an opposite-phase pair when their weights' cosine is at most this "
        "(default: -0.5, or lower where random units would reach it by chance: -sqrt(2 ln(D^2/2) / S)).",
        lower_bound=-1.0,
        upper_bound=0.0,
    )
    define_model_flag(SOURCE_MODEL_HELP)
    flags.DEFINE_integer(
        "image_size", None, "Input size, for a preset or weights file --source (default its own).", lower_bound=1
    )
    flags.mark_flag_as_required("source")


def _block_list(values):
    """--blocks as a list of distinct non-negative ints, in the given order."""
    blocks = []
    for value in values:
        if not value.strip().isdigit():
            raise ValueError(f"--blocks {','.join(values)!r}: {value!r} is not a block index (0, 1, 2, ...)")
        if int(value) not in blocks:
            blocks.append(int(value))
    if not blocks:
        raise ValueError("--blocks is empty: give block indices such as 0,1,2")
    return blocks


def _output_folder(out):
    """Checks that --out names a .png and creates its folder when missing."""
    if not out.lower().endswith(".png"):
        raise ValueError(f"--out {out!r} must name a .png file")
    folder = os.path.dirname(os.path.abspath(out))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out!r}: {existing!r} is a file, not a folder")
    os.makedirs(folder, exist_ok=True)


def run():
    def main():
        from keras_mixer.serving.trained_models import load_keras_model
        from keras_mixer.studies.token_pictures import draw

        with user_errors():
            blocks = _block_list(FLAGS.blocks)
            _output_folder(FLAGS.out)
            model, _ = load_keras_model(FLAGS.source, FLAGS.model, FLAGS.image_size)
            if not FLAGS["blocks"].present:
                blocks = [b for b in blocks if b < getattr(model, "num_blocks", len(blocks))]
            results = draw(
                model,
                FLAGS.out,
                blocks,
                units=FLAGS.units,
                scale=FLAGS.scale,
                pair_below=FLAGS.pair_below,
                title=FLAGS.source,
            )
        sidecar = os.path.splitext(FLAGS.out)[0] + ".json"
        drawn = ", ".join(f"block {r['block']}: {len(r['drawn'])} units, {len(r['pairs'])} pairs" for r in results)
        print(f"Wrote {FLAGS.out} and {sidecar} ({drawn})")

    run_program(_define, main)
