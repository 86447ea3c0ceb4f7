"""Generated V2 inference protocol (inference.*) and feedback (mnist.feedback.v1) gRPC modules."""
