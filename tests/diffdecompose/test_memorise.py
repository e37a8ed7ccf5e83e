"""Train/sample consistency by memorisation (benchmarks/memorise_diffdecompose.py, shortened): a tiny DiT trained by
the task's own loss on ONE watermark sample, then the task's sampler on that sample's composite, must return each
layer's latents close to the trainer's x0 target for that layer and much farther from the wrong answers (the other
layer, the composite, another sample's layer); a sampler fed the two noisy segments in the other order must fail.
The full run (1500 steps, both breaks) is `python benchmarks/memorise_diffdecompose.py --tiny`."""

import numpy as np
import pytest

from benchmarks import memorise_diffdecompose as mem

pytestmark = pytest.mark.slow

STEPS = 600  # fewer than the script's 1500 (its cost is mostly the train step's compile; a step takes ~20 ms)
MAX_REL, MARGIN = mem.MAX_REL, mem.MARGIN  # at 600 steps: own 0.41 / 0.39 against >= 0.83 / 0.87 to wrong answers


@pytest.fixture(scope="module")
def memorised():
    return mem.memorise(tiny=True, size=16, steps=STEPS, lr=3e-3, log=lambda msg: None)


def test_sampler_returns_the_memorised_layers(memorised):
    losses = memorised["losses"]
    assert np.mean(losses[-50:]) < 0.3 * np.mean(losses[:10])  # it did memorise (loss ~1.4 -> ~0.3)
    out, t = memorised["sample"](), memorised["targets"]
    assert np.array_equal(np.asarray(out["composite"]), t["composite"])  # the sampler's condition = the trainer's
    d = mem.distances(out, t)
    print(d)
    assert mem.consistent(d, MAX_REL, MARGIN), d
    # The layers returned in the other order fail the same check.
    assert not mem.consistent(mem.distances(dict(foreground=out["background"], background=out["foreground"]), t),
                              MAX_REL, MARGIN)


def test_a_sampler_feeding_the_segments_swapped_fails(memorised):
    with mem.broken("segment_order"):
        d = mem.distances(memorised["sample"](), memorised["targets"])
    print(d)
    assert not mem.consistent(d, MAX_REL, MARGIN), d
