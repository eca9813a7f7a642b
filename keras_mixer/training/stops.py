"""The two ways a training run stops before its end, as exceptions the programs turn into one line.

Standard library only, so the programs can tell them apart before TensorFlow is imported.
"""


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class TrainingStopped(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint of the current step was written first."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum
