"""The error of an adapter folder that cannot be used, below `metadata` and `base_modules`, which both raise it."""


class AdapterError(ValueError):
    """A folder that is not a usable sentiment_ray adapter."""
