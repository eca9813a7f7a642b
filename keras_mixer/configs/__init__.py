"""Training recipes shipped with the package: one file per recipe, each with `get_config()`
returning `TrainConfig` fields. `--config NAME` finds `NAME.py` here (from a checkout, an editable
install or a wheel alike); `--config path/to/recipe.py` reads any other file."""
