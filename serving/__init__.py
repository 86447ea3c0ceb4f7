"""gRPC inference server for the MNIST model (V2 inference protocol on onnxruntime)."""

__version__ = "0.1.0"
