"""Running the math on a device: numerics, compile and CUDA graphs, MNIST, checkpoints, batched generation,
and where the time goes."""
