"""The training engine on Keras' TensorFlow backend: tf.distribute strategies, the cluster's
start-up and preemption, the compiled step, tf.train checkpoints and the evaluator. The shared
loop (`keras_mixer.training.loop`) is handed this engine; nothing here imports the JAX wing."""
