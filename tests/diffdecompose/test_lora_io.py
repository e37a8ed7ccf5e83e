"""DiffDecompose LoRA files: the ICD settings ride in the metadata of any Flux LoRA format and read back from the
header; the adapters load back unchanged through the Flux loader."""

import jax
import numpy as np
import pytest
from flax import nnx

from omnijax.diffdecompose.lora_io import read_extra, save_decomposer_lora
from omnijax.models.flux.lora import FluxLoRA, lora_spec
from omnijax.models.flux.lora_files import load_flux_lora, save_flux_lora
from omnijax.models.flux.variants import variant
from omnijax.omnimatte.lora_io import LoRAFileError

CFG = variant("tiny", depth=1, depth_single_blocks=1)


@pytest.mark.parametrize("fmt", ["omnijax", "kohya", "diffusers"])
def test_extra_metadata_and_adapters_round_trip(tmp_path, fmt):
    lora = FluxLoRA(CFG, lora_spec(CFG, 3, 6.0), rngs=nnx.Rngs(0))
    for i, ad in enumerate(lora.adapters().values()):
        ad.lora_b[...] = jax.random.normal(jax.random.key(i), ad.lora_b.shape)
    extra = dict(icd=dict(fg_ids="axis0", lora_on=[True, False, True]), prompt=dict(template="T {blend}"))
    path = save_decomposer_lora(str(tmp_path / f"{fmt}.safetensors"), lora, fmt=fmt, extra=extra)
    assert read_extra(path) == extra
    back = load_flux_lora(path, CFG)
    for k, ad in lora.adapters().items():
        b = back.adapters()[k]
        delta = lambda a: np.asarray(a.lora_a[...]) @ np.asarray(a.lora_b[...]) * a.scale
        np.testing.assert_allclose(delta(b), delta(ad), rtol=1e-6, atol=1e-7)


def test_foreign_and_broken_files(tmp_path):
    lora = FluxLoRA(CFG, lora_spec(CFG, 2), rngs=nnx.Rngs(0))
    plain = str(tmp_path / "plain.safetensors")
    save_flux_lora(plain, lora)
    assert read_extra(plain) == {}
    (tmp_path / "junk.safetensors").write_bytes(b"no")
    with pytest.raises(LoRAFileError, match="readable"):
        read_extra(str(tmp_path / "junk.safetensors"))
