"""Data: Fashion-MNIST from local IDX files (default) and prepared TFDS datasets."""
from amq_jax.data import fashion_mnist
from amq_jax.data.fashion_mnist import DataError

__all__ = ["fashion_mnist", "DataError"]
