"""converters.registry: one loader for tiny, converted and original sources; parameters born sharded."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters import registry
from omnijax import sharding as shd
from omnijax.checkpoint import save_pretrained
from omnijax.params import flat_params


class WholeParamWatch:
    """Records every moment a device holds a whole copy of a parameter its rule splits.

    It looks at all live arrays from a polling thread while the load runs, after every jax.device_put, and once
    at the end: a shard whose shape is a split parameter's full shape is a whole copy on one device.
    """

    def __init__(self, split_shapes):
        self.split_shapes = set(split_shapes)
        self.seen = []
        self._stop = threading.Event()

    def scan(self, where):
        for a in jax.live_arrays():
            if id(a) in self.before:
                continue
            try:
                shards = a.addressable_shards
            except Exception:  # deleted while scanning
                continue
            for s in shards:
                if tuple(s.data.shape) in self.split_shapes:
                    self.seen.append((where, tuple(a.shape), str(a.sharding)))

    def __enter__(self):
        self.before = {id(a) for a in jax.live_arrays()}  # arrays of the test itself, not of the load
        self._put = jax.device_put

        def put(*a, **kw):
            out = self._put(*a, **kw)
            self.scan("device_put")
            return out

        jax.device_put = put
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.scan("poll")
            self._stop.wait(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        jax.device_put = self._put
        self.scan("end")


def _split_shapes(kind, mesh):
    cfg = registry.load.__globals__["_ref"](registry.model_kind(kind).tiny)()
    model_cls, _ = registry.model_classes(kind)
    abstract = nnx.eval_shape(lambda: model_cls(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    placements = shd.resolve(shd.state_shapes(abstract, nnx.Param), "fsdp", mesh)
    return {p.shape for p in placements.values() if any(s is not None for s in p.spec)}


@pytest.mark.parametrize("source", ["tiny", "converted"])
def test_fsdp8_load_never_holds_a_whole_split_parameter(tmp_path, source):
    mesh = shd.make_mesh(dict(fsdp=8))
    split = _split_shapes("wan_dit", mesh)
    assert split  # the kernels are split over fsdp
    path = "tiny"
    if source == "converted":
        _, model = registry.load("wan_dit", "tiny", dtype="f32", seed=3)
        want = {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()}
        path = save_pretrained(str(tmp_path / "dit"), model, "wan_dit")
        del model
    with WholeParamWatch(split) as watch:
        cfg, loaded = registry.load("wan_dit", path, dtype="f32", mesh=mesh, rules="fsdp", seed=3)
        jax.block_until_ready(nnx.state(loaded))
    assert not watch.seen, watch.seen[:5]
    kernel = loaded.blocks[0].ffn.linear_1.kernel.get_value()
    assert kernel.sharding.spec[0] == "fsdp" and len(kernel.sharding.device_set) == 8
    if source == "converted":  # the restored values are the saved ones
        got = {k: np.asarray(v.get_value()) for k, v in flat_params(loaded).items()}
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_tiny_is_the_same_model_on_any_mesh():
    _, one = registry.load("wan_dit", "tiny", dtype="f32", seed=1, rules="fsdp")  # one device
    _, eight = registry.load("wan_dit", "tiny", dtype="f32", seed=1, mesh=shd.make_mesh(dict(fsdp=8)), rules="fsdp")
    a, b = flat_params(one), flat_params(eight)
    assert a.keys() == b.keys()
    for k in a:
        assert np.asarray(a[k].get_value()).tobytes() == np.asarray(b[k].get_value()).tobytes(), k


def test_bad_kind_and_source_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model kind 'nope'; known: wan_dit"):
        registry.load("nope", "tiny")
    with pytest.raises(registry.ModelSourceError, match="no such file or folder"):
        registry.load("wan_vae", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown dtype 'f8'"):
        registry.dtype_of("f8")
