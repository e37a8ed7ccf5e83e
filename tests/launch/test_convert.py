"""launch/convert.py as a command: exit 0 with a restorable folder, exit 2 and nothing written on bad input.

The conversion itself (converters.registry.convert_to_folder) is tested in tests/converters.
"""

import jax.numpy as jnp

from launch import convert as convert_cli
from omnijax.checkpoint import load_pretrained
from tests.converters.test_casper import base_dir, states, write_casper_files  # noqa: F401  (fixtures)
from tests.converters.test_wan_dit import ref_state, write_wan_source  # noqa: F401  (fixture)


def test_convert_writes_a_folder_and_refuses_to_overwrite_it(tmp_path, ref_state):  # noqa: F811
    src = write_wan_source(tmp_path, ref_state)
    out = tmp_path / "converted"
    assert convert_cli.main(["--source", src, "--kind", "wan_dit", "--out", str(out), "--param-dtype", "f32"]) == 0
    assert convert_cli.main(["--source", src, "--kind", "wan_dit", "--out", str(out)]) == 2  # no silent overwrite
    cfg, _ = load_pretrained(str(out), kind="wan_dit", dtype=jnp.float32, param_dtype=jnp.float32)
    assert cfg.num_heads == 2


def test_bad_input_exits_2_and_writes_nothing(tmp_path, base_dir, states):  # noqa: F811
    assert convert_cli.main(["--source", str(tmp_path / "nope.safetensors"), "--kind", "wan_dit",
                             "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    t_path, _, _ = write_casper_files(tmp_path, states)
    assert convert_cli.main(["--kind", "wan_vae", "--source", str(base_dir), "--casper", str(t_path),
                             "--out", str(tmp_path / "x")]) == 2
    assert convert_cli.main(["--kind", "wan_dit", "--source", str(base_dir), "--param-dtype", "f32",
                             "--casper-lora", str(t_path), "--out", str(tmp_path / "y")]) == 2  # not a LoRA
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
