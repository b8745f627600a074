"""User-facing errors: the command line prints these as one line, never as a traceback."""

# The distribution is "replica-alexnet" (the import name and the command stay "replica"): an
# unrelated "replica" exists on the package index, so no hint names an extra of that name. From a
# clone, the editable install with the extra is what a user can paste safely.


def install_hint(extra: str) -> str:
    """The command that installs an optional extra, safe to paste in a clone of replica."""
    return f"pip install -e '.[{extra}]' in replica's folder (the distribution replica-alexnet)"


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
