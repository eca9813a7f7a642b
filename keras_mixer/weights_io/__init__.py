"""Weights in and out: weights files and their formats, the official key names, named presets,
timm's repos, keras-hub preset folders, the hubs, and the one resolver of a source string that
every program and `from_preset` uses."""
