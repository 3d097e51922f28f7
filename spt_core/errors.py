"""One error type for everything a user can get wrong; the CLI turns it into one line and exit code 2."""


class SensituneError(ValueError):
    """A user-facing error whose message is one line: what, which file/flag/value, and how to fix it."""


class DataError(SensituneError):
    """Bad input data (missing directory, empty class, corrupt image, unknown label, ...)."""


class ModelError(SensituneError):
    """A backbone or weights file that cannot be created or loaded."""


class PlanError(SensituneError):
    """A budget, plan or adapter file that does not fit the model."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type name), at most `limit` characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
