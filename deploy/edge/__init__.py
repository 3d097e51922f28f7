"""The box: the torch-free edge (artifact contract, inferencer, service, rollout, sync, operator pages).

Imports no torch, no timm and nothing from deploy.compile; from spt_core only spt_core.portable
(tests/test_architecture.py keeps this by construction).
"""
