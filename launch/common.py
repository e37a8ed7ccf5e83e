"""What the entry points share: omnijax's default XLA flags, set when an entry point imports this module (first).

Models come from converters.registry (one loader, one dtype table); tasks from tasks/.
"""

from omnijax.xla_flags import setup_xla_flags

setup_xla_flags()  # at import, before any jax computation initialises the backend
