"""Deployment: ONNX export with metadata and parity, the ONNX Runtime backend, INT8 quantisation, benchmarks."""
