"""Errors, named by meaning. Each message names the file and the reason."""


class BatchcxrError(Exception):
    """Base class for errors batchcxr raises on purpose."""


class ConfigError(BatchcxrError):
    """Settings that cannot work (unknown key, wrong type, missing model)."""


class InputError(BatchcxrError):
    """A file that cannot be taken as it is. ``reason`` is what the run records."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class FileVanished(InputError):
    """The file was removed or renamed between finding and reading it (not a failure)."""


class FileChanged(InputError):
    """The file changed while it was read (it is being written): read it again later."""


class NotRegularFile(InputError):
    """A symlink, FIFO, device, socket or folder where a file was expected: never read."""


class FileTooLarge(InputError):
    """Larger than ``max_file_bytes``: refused before reading."""


class ModelLoadError(BatchcxrError):
    """ONNX Runtime could not open a model's graph (its card and hash were fine): nothing can be
    scored until the model is replaced or ONNX Runtime fixed."""
