"""The one exception type a user's bad checkpoint or bad input raises."""


class CheckpointError(ValueError):
    """A checkpoint directory, file, tensor or config key is missing or wrong.

    The message always names the file and the tensor or key at fault.
    """
