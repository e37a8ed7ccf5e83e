"""benchmarks/memorise_omnimatte.py at tiny sizes: the omnimatte sampler (Decomposer, dual-expert loop) reproduces
an independent Euler loop over the trained models fed the TRAINERS' conditioning (tasks/inpaint.py and
tasks/omnimatte.py batches), and the check fails when the sampler is broken on purpose. The memorisation numbers
themselves need thousands of steps (the GPU command in the script's docstring); here the models train a few steps,
enough for a non-trivial velocity field."""

import pytest

from benchmarks import memorise_omnimatte as mem


@pytest.mark.slow
def test_sampler_reproduces_the_trainers_ode_and_breaks_are_caught():
    s = mem.settings(tiny=True, base_steps=5, expert_steps=3, sampler_steps=4)
    breaks = ("none", "velocity_sign", "mask_inverted", "frames_reversed")
    res = mem.run(s, breaks=breaks, taus=((0.5, "dual"),), log=lambda *_: None)
    assert res["base"]["loss_last"] > 0 and res["effect"]["loss_last"] > 0
    assert mem.failures(res["samples"]["none"], memorised=False) == []
    for brk in breaks[1:]:
        assert mem.failures(res["samples"][brk], memorised=False), f"the check missed the break {brk!r}"
