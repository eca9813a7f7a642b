"""Serving a trained model: the TF Serving export (and freeze, ONNX), loading a trained model from
whatever a user points at, and labelling image files as the serving signature prepares them."""
