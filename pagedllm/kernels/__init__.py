"""Kernels the model's layers run on: cpu/ (native C++ kernels loaded with ctypes, oneDNN-packed linears) and
triton/ (GPU kernels). Which of them a layer uses is decided when the layer is built."""
