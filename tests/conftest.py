"""8 fake CPU devices for sharding tests; f32 matmuls at full precision for parity tests; fast CPU compiles."""

import os
import sys

# The suite's time is mostly XLA compiling small programs on the CPU: its cheap backend settings compile about a
# third faster (measured on the slowest tests, 2026-11-29). OMNIJAX_TEST_XLA_OPT=1 keeps XLA's defaults.
_FAST = ("" if os.environ.get("OMNIJAX_TEST_XLA_OPT") == "1" else
         " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + _FAST).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def example_clip(tmp_path_factory):
    """The repository's own example clip (data/example_clip.py), small: 11 frames (not 4k+1, so the decompose
    CLI pads it), 96x160, two objects with shadows. Returns its folder."""
    from data.example_clip import write_example

    return write_example(str(tmp_path_factory.mktemp("example") / "two_objects"), frames=11, height=96, width=160)
