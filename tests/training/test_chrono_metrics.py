"""Chrono (fake clock) and the JSONL / TensorBoard metric writer."""

import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.training.chrono import Chrono
from omnijax.training.metrics import MetricWriter, read_jsonl


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_chrono_excludes_compile_and_pauses():
    clock = FakeClock()
    c = Chrono(total_steps=110, examples_per_step=16, first_step=10, num_devices=4, clock=clock)
    assert c.step_time is None and c.eta_s is None
    clock.t += 30.0  # step 11: compile + run
    c.tick(11)
    assert c.first_step_s == 30.0 and c.step_time is None
    for s in range(12, 22):
        clock.t += 2.0
        if s == 15:
            with c.paused():  # a checkpoint taking 100 s is not step time
                clock.t += 100.0
        c.tick(s)
    assert c.step_time == pytest.approx(2.0)
    assert c.eta_s == pytest.approx(2.0 * (110 - 21))
    assert c.examples_per_s_per_device == pytest.approx(16 / 2.0 / 4)
    clock.t += 20.0  # ticking only every 10 steps
    c.tick(31)
    assert c.step_time == pytest.approx(2.0)
    m = c.metrics()
    assert m["chrono/progress"] == pytest.approx(31 / 110) and m["chrono/step_s"] == pytest.approx(2.0)
    assert "step 31/110" in c.summary() and "ETA 0h02m" in c.summary()
    with pytest.raises(ValueError, match="not after the last tick"):
        c.tick(31)


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
    with MetricWriter(tmp_path) as w:
        w.write(1, loss=jnp.float32(0.5), lr=1e-3)
        w.write(2, {"loss": np.float32(0.25), "finite": jnp.array(True)})
        w.write(3, loss=float("nan"))
        with pytest.raises(ValueError, match="not a scalar"):
            w.write(4, loss=jnp.ones(3))
        with pytest.raises(ValueError, match="own field"):
            w.write(4, {"step": 4})
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert recs[0] == {"step": 1, "loss": 0.5, "lr": 1e-3}
    assert recs[1] == {"step": 2, "loss": 0.25, "finite": True}
    assert recs[2] == {"step": 3, "loss": "nan"}
    # A resumed run appends to the same file.
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(5, loss=0.125)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 5]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    # Parse the TFRecord framing (u64 length, u32 crc, payload, u32 crc) and tensorboardX's Event proto.
    from tensorboardX.proto import event_pb2

    data = events[0].read_bytes()
    tags, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 8], "little")
        ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        tags += [(ev.step, v.tag, round(v.simple_value, 6)) for v in ev.summary.value]
        pos += 12 + n + 4
    assert (1, "loss", 0.5) in tags and (2, "loss", 0.25) in tags


def test_metric_writer_is_silent_off_process_zero(tmp_path):
    with MetricWriter(tmp_path / "p1", process_index=1) as w:
        w.write(1, loss=1.0)
    assert not (tmp_path / "p1").exists()
