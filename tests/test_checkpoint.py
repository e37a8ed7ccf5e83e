"""omnijax.checkpoint: the unsharded restore (tensorstore straight, batched puts) gives orbax's arrays, and names
what does not fit."""

import json
import os
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from converters import registry
from omnijax import checkpoint as ckpt
from omnijax.params import flat_params


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny f32 Wan DiT written by save_pretrained, and its parameters as numpy."""
    _, model = registry.load("wan_dit", "tiny", dtype="f32", seed=5)
    path = ckpt.save_pretrained(str(tmp_path_factory.mktemp("ckpt") / "dit"), model, "wan_dit")
    return path, {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()}


def _arrays(model):
    return {k: v.get_value() for k, v in flat_params(model).items()}


def _load(path, dtype, *, fast: bool, monkeypatch):
    """registry.load with the tensorstore path, or forced through orbax; asserts which one ran."""
    used = []
    start = ckpt._HostRead.start

    def spy(directory):
        reader = start(directory) if fast else None
        used.append(reader is not None)
        return reader

    with monkeypatch.context() as m:
        m.setattr(ckpt._HostRead, "start", staticmethod(spy))
        _, model = registry.load("wan_dit", path, dtype=dtype)
    assert used == [fast]
    return model


@pytest.mark.parametrize("dtype,window", [("f32", None), ("bf16", None), ("bf16", 4096)])
def test_unsharded_restore_is_orbax_restore(saved, dtype, window, monkeypatch):
    """window: bytes of reads in flight and per device_put (the tiny model fits in the default ones; 4 KiB makes
    the reader wait for earlier reads and put many batches)."""
    path, want = saved
    if window:
        monkeypatch.setattr(ckpt, "_FIRST_READ_BYTES", window)
        monkeypatch.setattr(ckpt, "_READ_BYTES", window)
        monkeypatch.setattr(ckpt, "_PUT_BYTES", window)
    got = _arrays(_load(path, dtype, fast=True, monkeypatch=monkeypatch))
    ref = _arrays(_load(path, dtype, fast=False, monkeypatch=monkeypatch))
    assert got.keys() == ref.keys() == want.keys()
    device = jax.devices()[0]
    for k, x in got.items():
        # f32 islands stay f32 under bf16; the rest is the saved value rounded to bf16 (ml_dtypes, independently).
        expect = want[k].astype(ref[k].dtype if ref[k].dtype == np.float32 else ml_dtypes.bfloat16)
        assert x.dtype == ref[k].dtype == expect.dtype, k
        assert np.asarray(x).tobytes() == expect.tobytes() == np.asarray(ref[k]).tobytes(), k
        # Committed to the first device, as orbax's restore leaves them.
        assert x.sharding == ref[k].sharding == jax.sharding.SingleDeviceSharding(device), k
        assert x.committed and ref[k].committed, k
    if dtype == "bf16":
        assert {str(x.dtype) for x in got.values()} == {"bfloat16", "float32"}  # the cast ran, islands kept


def _edit_header(path, tmp_path, **config):
    """A copy of the checkpoint whose header asks for another config (the arrays stay as saved)."""
    copy = str(tmp_path / "edited")
    shutil.copytree(path, copy)
    with open(os.path.join(copy, "omnijax.json")) as f:
        header = json.load(f)
    header["config"].update(config)
    with open(os.path.join(copy, "omnijax.json"), "w") as f:
        json.dump(header, f)
    return copy


def test_missing_unexpected_and_reshaped_arrays_are_named(saved, tmp_path):
    path, want = saved
    layers = json.load(open(os.path.join(path, "omnijax.json")))["config"]["num_layers"]
    fewer = _edit_header(path, tmp_path / "fewer", num_layers=layers - 1)
    with pytest.raises(ckpt.CheckpointError, match=rf"arrays not in the model \['blocks\.{layers - 1}\."):
        registry.load("wan_dit", fewer, dtype="f32")
    more = _edit_header(path, tmp_path / "more", num_layers=layers + 1)
    with pytest.raises(ckpt.CheckpointError, match=rf"missing from the checkpoint \['blocks\.{layers}\."):
        registry.load("wan_dit", more, dtype="f32")
    ffn = want["blocks.0.ffn.linear_1.kernel"].shape[1]
    wider = _edit_header(path, tmp_path / "wider", ffn_dim=ffn * 2)
    with pytest.raises(ckpt.CheckpointError, match=r"of another shape \['blocks\.0\.ffn\.linear_1\.bias "
                                                   rf"\({ffn},\) \(model \({2 * ffn},\)\)"):
        registry.load("wan_dit", wider, dtype="f32")


@pytest.mark.parametrize("layout", [dict(use_zarr3=True), dict(use_ocdbt=False)])
def test_other_orbax_layouts(saved, layout, tmp_path, monkeypatch):
    """zarr3 inside OCDBT is read by the tensorstore path; a layout without OCDBT goes through orbax. Both give the
    saved values."""
    path, want = saved
    other = _edit_header(path, tmp_path)
    params = os.path.join(other, "params")
    tree = ocp.PyTreeCheckpointer().restore(params)
    shutil.rmtree(params)
    ocp.PyTreeCheckpointer(**layout).save(params, tree)
    with open(os.path.join(params, "_METADATA")) as f:
        meta = json.load(f)
    assert (meta["use_zarr3"], meta["use_ocdbt"]) == (layout.get("use_zarr3", False), layout.get("use_ocdbt", True))
    model = _load(other, "f32", fast=layout.get("use_ocdbt", True), monkeypatch=monkeypatch)
    got = _arrays(model)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)


def test_a_sharded_load_never_takes_the_host_path(saved, monkeypatch):
    """shardings= reads each array into its shards (orbax); the whole-array host path must not run."""
    from omnijax import sharding as shd

    path, want = saved
    monkeypatch.setattr(ckpt._HostRead, "start", staticmethod(lambda d: pytest.fail("host path with a mesh")))
    _, model = registry.load("wan_dit", path, dtype="f32", mesh=shd.make_mesh(dict(fsdp=8)), rules="fsdp")
    kernel = model.blocks[0].ffn.linear_1.kernel.get_value()
    assert len(kernel.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(kernel), want["blocks.0.ffn.linear_1.kernel"])


def test_a_failed_read_raises_instead_of_waiting(saved, monkeypatch):
    """An error while issuing or waiting for a read reaches the caller, and a load never hangs; a damaged data file
    is named by its array."""
    import threading

    path, _ = saved

    def load_in_thread(path):
        box = {}

        def run():
            try:
                registry.load("wan_dit", path, dtype="f32")
            except BaseException as e:
                box["error"] = e
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the load hangs"
        return box.get("error")

    calls = []

    def failing(shape, dtype):
        calls.append(shape)
        if len(calls) == 3:
            raise MemoryError("no room for the third array")
        return np.empty(shape, dtype)

    with monkeypatch.context() as m:
        m.setattr(ckpt, "_FIRST_READ_BYTES", 1)  # one read at a time: the third is issued after the build
        m.setattr(ckpt, "_READ_BYTES", 1)
        m.setattr(ckpt, "_aligned_empty", failing)
        assert isinstance(load_in_thread(path), MemoryError)
    damaged = str(saved[0]) + "-damaged"
    shutil.copytree(path, damaged)
    data = os.path.join(damaged, "params", "ocdbt.process_0", "d")
    big = max(os.listdir(data), key=lambda f: os.path.getsize(os.path.join(data, f)))
    with open(os.path.join(data, big), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(data, big)) // 2)
    err = load_in_thread(damaged)
    # Which of the arrays in the lost half is reported depends on which concurrent read fails first (a block's
    # kernel, or e.g. condition.text_embedding's, stored in the same file): any of the model's arrays, by name.
    named = re.search(r"cannot read array '([^']+)'", str(err)) if isinstance(err, ckpt.CheckpointError) else None
    assert named is not None and named.group(1) in saved[1], err
