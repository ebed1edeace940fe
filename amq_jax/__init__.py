"""amq-jax: Hessian-aware automatic mixed-precision quantization for JAX/Flax (HAWQ-V2)."""
__version__ = "0.1.0"
