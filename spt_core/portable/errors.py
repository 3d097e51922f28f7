"""One error type for everything a user can get wrong; the CLI turns it into one line and exit code 2."""


class SensituneError(ValueError):
    """A user-facing error whose message is one line: what, which file/flag/value, and how to fix it."""


class DataError(SensituneError):
    """Bad input data (missing directory, empty class, corrupt image, unknown label, ...)."""


class ModelError(SensituneError):
    """A backbone or weights file that cannot be created or loaded."""


class PlanError(SensituneError):
    """A budget, plan or tuned-weights directory that does not fit the model."""


class DivergedError(SensituneError):
    """Training whose loss became non-finite: a user's lr to lower, or a search candidate to drop."""


def one_line(e: BaseException, limit: int | None = 200) -> str:
    """The gist of an exception on one line (whitespace collapsed), at most ``limit`` characters (None: whole, for
    messages whose end holds the fix, such as the registry's); its type if empty.

    Library messages (torch, timm, OpenVINO) often span paragraphs; this is what to quote inside ours. OpenVINO
    puts its reason after "Exception from <source file>" lines, so for those only the last line is kept.
    """
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Exception from"):
        lines = lines[-1:]
    text = " ".join(" ".join(lines).split()) or type(e).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def few(items: list[str], shown: int = 5) -> str:
    """The first `shown` of `items` and how many more: every bad file named in one line that stays short."""
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more} more" if more > 0 else "")


CLASS_NAME_MAX = 64
CLASS_NAME_CHARS = "letters, digits, space and _ . + - ( ), starting with a letter or digit"


def check_class_name(name: object, where: str) -> str:
    """`name` if it may name a class, else a one-line `DataError` naming it, `where` it is and the allowed set.

    A class name becomes a folder, a CSV column, a label in the edge's logs and text on the operator pages; the safe
    set (at most `CLASS_NAME_MAX` of `CLASS_NAME_CHARS`) keeps it plain in each of them: no markup, no quotes, no
    path separators. Prepare, import and the edge's artifact contract all check it here.
    """
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= CLASS_NAME_MAX
        and name[0].isalnum()
        and name == name.rstrip()
        and all(c.isalnum() or c in " _.+-()" for c in name)
    )
    if not ok:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise DataError(f"{where}: class name {shown} is not allowed; use 1..{CLASS_NAME_MAX} {CLASS_NAME_CHARS}")
    return name
