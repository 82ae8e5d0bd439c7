"""The errno answers of the emulated kernel."""

import os


class FsError(Exception):
    """A request refused with ``errno``, as the kernel would refuse it."""

    def __init__(self, err: int, detail: str = ""):
        super().__init__(detail or os.strerror(err))
        self.errno = err


class RequestError(ValueError):
    """A request that the emulated kernel refuses; the message is for a human."""
