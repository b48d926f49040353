"""tfadam: TensorFlow\x27s Adam, bit for bit, on PyTorch tensors."""
