"""User-facing errors: the command line prints these as one line, never as a traceback."""


class ReplicaError(Exception):
    """A mistake in what the user asked for (config, devices, paths, files)."""
