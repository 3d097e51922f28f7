"""Plain helpers that several test files share: builders of tiny artifacts, servers, projects and tuner cases.

Fixtures live in tests/conftest.py (pytest finds them, nothing imports them); what a test calls lives here and is
imported as ``from support.<module> import ...`` (pytest puts tests/ on sys.path). Test files never import each
other (tests/test_test_layout.py checks it). What the benchmarks share with the tests (the statistic model, the
demo line, `serve`) has its home in benchmarks/ and is re-exported here; benchmarks/ never imports tests/.
"""
