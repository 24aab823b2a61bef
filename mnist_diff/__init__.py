"""mnist-diff: train, sample, score and compare diffusion models on MNIST."""

__version__ = "0.1.0"
