"""Triton Inference Server: model repository layout, config generation and the server launcher."""
