"""One error type for everything a user can get wrong; the CLI turns it into one line and exit code 2."""


class SensituneError(ValueError):
    """A user-facing error whose message is one line: what, which file/flag/value, and how to fix it."""


class DataError(SensituneError):
    """Bad input data (missing directory, empty class, corrupt image, unknown label, ...)."""


class ModelError(SensituneError):
    """A backbone or weights file that cannot be created or loaded."""


class PlanError(SensituneError):
    """A budget, plan or tuned-weights directory that does not fit the model."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """The gist of an exception on one line (whitespace collapsed), at most ``limit`` characters; its type if empty.

    Library messages (torch, timm, OpenVINO) often span paragraphs; this is what to quote inside ours. OpenVINO
    puts its reason after "Exception from <source file>" lines, so for those only the last line is kept.
    """
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Exception from"):
        lines = lines[-1:]
    text = " ".join(" ".join(lines).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
