"""The benchmark wing: scripts that measure the product and write the committed tables in `benchmarks/results/`.

A consumer of the three layers (it may import `pipelines`, `deploy` and `spt_core`); nothing in the product imports
it back (tests/test_architecture.py). Each script runs as ``python benchmarks/<name>.py`` or ``python -m
benchmarks.<name>``; both find this package through the editable install, so no script edits ``sys.path``.
"""
