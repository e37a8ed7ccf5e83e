"""benchmarks/memorise_omnimatte.py at tiny sizes, without training steps (their compile is most of the script's CPU
time; the memorisation itself needs thousands of steps, the GPU command in the script's docstring): the omnimatte
sampler (Decomposer, dual-expert loop, the experts' background branch) reproduces an independent Euler loop over
the same models fed the TRAINERS' conditioning (the tasks/inpaint.py and tasks/omnimatte.py batches), and the check
fails when the sampler is broken on purpose."""

import pytest

from benchmarks import memorise_omnimatte as mem


@pytest.mark.slow
def test_sampler_reproduces_the_trainers_ode_and_breaks_are_caught():
    s = mem.settings(tiny=True, base_steps=0, expert_steps=0, sampler_steps=4)
    breaks = ("none", "velocity_sign", "frames_reversed")
    res = mem.run(s, breaks=breaks, taus=((0.5, "dual"),), log=lambda *_: None)
    assert mem.failures(res["samples"]["none"], memorised=False) == []
    for brk in breaks[1:]:
        assert mem.failures(res["samples"][brk], memorised=False), f"the check missed the break {brk!r}"
