"""Errors, named by meaning. Each message names the file and the reason."""


class BatchcxrError(Exception):
    """Base class for errors batchcxr raises on purpose."""


class InputError(BatchcxrError):
    """A file that cannot be scored (it is recorded as failed and kept in place)."""


class ConfigError(BatchcxrError):
    """Settings that cannot work (unknown key, wrong type, missing model)."""
