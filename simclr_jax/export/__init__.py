"""Exports of a pretrained encoder for use outside this project (PyTorch, TensorFlow).

`torch_weights`: the encoder as a PyTorch state dict with torchvision's key names (numpy and
safetensors only, no torch needed to write it); `torch_resnet`: a torch-only module that loads any
such export; `savedmodel`: a TensorFlow SavedModel of the inference encoder via jax2tf; `job`: the
export job (`configs/export.py`).
"""
