"""omnijax.omnimatte.decompose.StageClock: stages timed when their outputs are ready, not when dispatched."""

import time

import pytest

from omnijax.omnimatte.decompose import StageClock


class Pending:
    """Stands in for a device array still being computed: ready at a given time (or failing then)."""

    def __init__(self, ready_at, error=False):
        self.ready_at, self.error = ready_at, error

    def block_until_ready(self):
        time.sleep(max(0.0, self.ready_at - time.perf_counter()))
        if self.error:
            raise RuntimeError("device failure")
        return self


def test_stages_are_timed_between_results():
    timings = {"sampler": 1.0}  # accumulates onto what is there
    t0 = time.perf_counter()
    clock = StageClock(timings)
    clock.mark("vae_encode", Pending(t0 + 0.3))
    clock.mark("sampler", {"z": Pending(t0 + 0.5), "n": 3})
    clock.mark("vae_decode", (Pending(t0 + 0.55), Pending(t0 + 0.9)))
    assert time.perf_counter() - t0 < 0.25  # marking never waits (the first stage is ready at 0.3 s)
    clock.close()
    assert timings["vae_encode"] == pytest.approx(0.3, abs=0.08)
    assert timings["sampler"] == pytest.approx(1.2, abs=0.08)
    assert timings["vae_decode"] == pytest.approx(0.4, abs=0.08)  # the slowest of its outputs


def test_a_failed_stage_does_not_stop_the_clock_and_is_raised_by_close():
    timings = {}
    t0 = time.perf_counter()
    clock = StageClock(timings)
    clock.mark("sampler", Pending(t0 + 0.1, error=True))
    clock.mark("vae_decode", Pending(t0 + 0.2))
    with pytest.raises(RuntimeError, match="device failure"):
        clock.close()
    assert set(timings) == {"sampler", "vae_decode"}
    clock = StageClock({})
    clock.mark("sampler", Pending(time.perf_counter(), error=True))
    clock.close(check=False)  # the caller is already raising another error


def test_a_clock_after_another_times_its_first_stage_from_the_others_end():
    # Clip 2 is dispatched while clip 1 still runs (0 - 0.4 s): its first stage, ready at 0.5 s, took 0.1 s of
    # device time, not the 0.5 s since its clock was made.
    t0 = time.perf_counter()
    first, second = {}, {}
    clock1 = StageClock(first)
    clock1.mark("sampler", Pending(t0 + 0.2))
    clock1.mark("postprocess", Pending(t0 + 0.4))
    clock2 = StageClock(second, after=clock1)
    clock1.mark("late", Pending(t0 + 0.9))  # marked after clock2 was made: not clock2's business
    clock2.mark("encoders", Pending(t0 + 0.5))
    clock2.mark("sampler", Pending(t0 + 0.7))
    clock2.close()
    clock1.close()
    assert first["postprocess"] == pytest.approx(0.2, abs=0.08)
    assert second["encoders"] == pytest.approx(0.1, abs=0.08)
    assert second["sampler"] == pytest.approx(0.2, abs=0.08)


def test_a_stage_ready_before_the_previous_clips_end_takes_no_time():
    # Clip 2's first stage needs no device work (cached embeddings): ready at 0.05 s while clip 1 runs until 0.4 s.
    # It took no time of its own, and its second stage is timed from clip 1's end, not from 0.05 s.
    t0 = time.perf_counter()
    first, second = {}, {}
    clock1 = StageClock(first)
    clock1.mark("postprocess", Pending(t0 + 0.4))
    clock2 = StageClock(second, after=clock1)
    clock2.mark("encoders", Pending(t0 + 0.05))
    clock2.mark("vae_encode", Pending(t0 + 0.5))
    clock2.close()
    clock1.close()
    assert second["encoders"] == 0.0
    assert second["vae_encode"] == pytest.approx(0.1, abs=0.06)
