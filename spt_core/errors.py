"""One error type for everything a user can get wrong; the CLI turns it into one line and exit code 2."""


class SensituneError(ValueError):
    """A user-facing error whose message is one line: what, which file/flag/value, and how to fix it."""


class DataError(SensituneError):
    """Bad input data (missing directory, empty class, corrupt image, unknown label, ...)."""


class ModelError(SensituneError):
    """A backbone or weights file that cannot be created or loaded."""


class PlanError(SensituneError):
    """A budget, plan or adapter file that does not fit the model."""
