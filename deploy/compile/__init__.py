"""The torch side of deployment: merged model -> ONNX -> OpenVINO FP32/FP16/INT8, verified against PyTorch.

Runs where training runs (it imports torch and spt_core); nothing under deploy/edge imports it.
"""
