"""Data: Fashion-MNIST from local IDX files (default) and prepared TFDS datasets."""
from amq_jax.data import fashion_mnist
from amq_jax.data.fashion_mnist import DataError
from amq_jax.data import tfds_reader
from amq_jax.data.tfds_reader import load_tfds
from amq_jax.data._sources import InMemorySource, TfdsSource, as_source

__all__ = ["fashion_mnist", "DataError", "tfds_reader", "load_tfds", "InMemorySource", "TfdsSource",
           "as_source"]
