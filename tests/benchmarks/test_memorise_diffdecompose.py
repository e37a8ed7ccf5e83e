"""benchmarks/memorise_diffdecompose.py: bad arguments are one-line usage errors, and the pass rule against hand-made
distances (the training and sampling run itself: tests/diffdecompose/test_memorise.py)."""

import pytest

from benchmarks import memorise_diffdecompose as mem


@pytest.mark.parametrize("args", [["--size", "24"], ["--steps", "-1"], ["--sampler-steps", "-2"], ["--lr", "-1"]])
def test_bad_arguments_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as e:
        mem.main(["--tiny", *args])
    assert e.value.code == 2 and "must be" in capsys.readouterr().err


def _d(fg_own, fg_wrong, bg_own, bg_wrong):
    row = lambda own, wrong, layer, other: {layer: own, other: wrong, "composite": 1.0, "other_" + layer: 1.0,
                                            "other_" + other: 0.0}
    return dict(foreground=row(fg_own, fg_wrong, "foreground", "background"),
                background=row(bg_own, bg_wrong, "background", "foreground"))


def test_pass_rule():
    assert mem.consistent(_d(0.3, 1.2, 0.3, 1.2))  # (the other sample's other layer is no wrong answer: 0.0 ignored)
    assert not mem.consistent(_d(0.55, 1.2, 0.3, 1.2))  # own above MAX_REL
    assert not mem.consistent(_d(0.3, 0.45, 0.3, 1.2))  # closer than MARGIN x the other layer
    assert not mem.consistent(_d(0.3, 1.2, 1.2, 0.3))  # one layer swapped
