"""Serving side: ONNX Runtime model, dynamic batcher, gRPC servicer and server lifecycle (no torch)."""
