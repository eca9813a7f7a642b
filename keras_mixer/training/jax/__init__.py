"""The training engine on Keras' JAX backend: data parallelism over every device of every host,
the device-resident `JaxTrainStep`, orbax checkpoints and the evaluator. The shared loop
(`keras_mixer.training.loop`) is handed this engine; nothing here imports the TensorFlow wing."""
