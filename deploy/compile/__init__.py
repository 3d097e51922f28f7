"""The torch side of deployment: merged model -> ONNX -> each precision of `deploy.edge.precision` (`build.py`),
verified against PyTorch (`verify.py`) through the one model runner (`inferencer.py` adds PyTorch to the edge's).

Runs where training runs (it imports torch and spt_core); nothing under deploy/edge imports it.
"""
