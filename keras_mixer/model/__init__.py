"""The network: the paper's layers and `MlpMixer`, the variants by name, the keras.applications
constructors, the resolution change, the pixels a model takes and the record of what it was
trained on. Keras only (no TensorFlow)."""
