"""Triton block-sparse kernels, installed as `hf_sdt.kernels`: tensors in, tensors out."""
