"""User-facing errors: the command line prints these as one line, never as a traceback."""


class ReplicaError(Exception):
    """A mistake in what the user asked for (config, devices, paths, files).

    ``quiet``: the same stop, raised in every process of a torchrun job but rank 0; only rank 0
    says it (and its exit status is the job's), so a user reads one message, not one per process.
    ``agreed``: every process of the job raised it at the same step (they decided it together),
    so each may leave the job cleanly.
    """

    def __init__(self, *args, quiet: bool = False, agreed: bool = False):
        super().__init__(*args)
        self.quiet, self.agreed = quiet, agreed


class TrainingStopped(ReplicaError):
    """The run stopped on purpose (NaN loss); the message says why and what was kept."""
