"""The operator pages' demo line, as the UI tests use it: its home is `benchmarks/demo_line.py` (benchmarks/ui_pages.py
plays the same line for the screenshots), re-exported here so the tests import it like every other helper.
"""

from __future__ import annotations

from benchmarks.demo_line import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TOKENS,
    Line,
    build_line,
    create_app_with_tokens,
    label_of,
    launch,
    send,
)

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "TOKENS", "Line", "build_line", "create_app_with_tokens", "label_of", "launch",
           "send"]  # fmt: skip
