"""amq-jax: Hessian-aware automatic mixed-precision quantization for JAX/Flax (HAWQ-V2)."""
__version__ = "0.1.0"

from amq_jax._hostdev import use_host_devices  # noqa: E402,F401  (no JAX import at load)
