"""Training side: real MNIST data, the seed Keras model, training with TensorBoard, ONNX export."""
