"""Errors, named by meaning. Each message names the file and the reason."""


class BatchcxrError(Exception):
    """Base class for errors batchcxr raises on purpose."""


class ConfigError(BatchcxrError):
    """Settings that cannot work (unknown key, wrong type, missing model)."""
