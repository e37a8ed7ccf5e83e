"""launch/decompose.py refuses bad input before any model is built, never deletes what it did not write, keeps
its results on a late failure, and runs batches of clips with per-clip failures. Models are replaced by a stub
where only the checks, the driver and the writing are under test (the real models: tests/launch/test_decompose.py).
"""

import gc
import json
import os
import threading
import time
import weakref

import numpy as np
import pytest

from launch import decompose
from omnijax.io.video import read_video, write_frames, write_video


class ModelsBuilt(Exception):
    pass


@pytest.fixture
def no_models(monkeypatch):
    """Any attempt to build the models fails the test: every check must come first."""
    def build(args):
        raise ModelsBuilt("the models were built before the input was checked")
    monkeypatch.setattr(decompose, "build_decomposer", build)


class EchoDecomposer:
    """Stands in for the models: background = the input, alpha_k = mask_k (so eq. 2 holds exactly)."""

    calls = 0

    def __call__(self, video, masks, settings, *, prompt="", timings=None, clock=None):
        EchoDecomposer.calls += 1
        if masks.shape[0] == 3:
            raise RuntimeError("out of memory (a stand-in failure inside the models)")
        return np.asarray(video, np.float32), np.asarray(masks, np.float32)


@pytest.fixture
def echo_models(monkeypatch):
    built = []
    monkeypatch.setattr(decompose, "build_decomposer", lambda args: built.append(1) or EchoDecomposer())
    return built


def _clip(tmp_path, name="clip", frames=5, h=32, w=48, mask_frames=None, value=255):
    d = tmp_path / name
    d.mkdir()
    t, y, x = np.meshgrid(np.arange(frames), np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    smooth = np.stack([x, y, 0.5 + 0.4 * np.sin(t + 3 * x)], -1)  # survives resizing and h264 nearly unchanged
    write_frames(str(d / "video"), (smooth * 255).round().astype(np.uint8))
    m = np.zeros((mask_frames or frames, h, w), np.uint8)
    m[:, 8:20, 10:30] = value
    write_frames(str(d / "mask"), m)
    return str(d / "video"), str(d / "mask")


def _batch_args(tmp_path, names, clips):
    """--video/--masks/--out of each clip (its output folder tmp_path/o<name>)."""
    return [x for n, (v, m) in zip(names, clips)
            for x in ("--video", v, "--masks", m, "--out", str(tmp_path / f"o{n}"))]


def _main(video, masks, out, *extra, tmp_path):
    return decompose.main(["--video", video, "--masks", *masks, "--out", out, "--model", "tiny",
                           "--compile-cache", str(tmp_path / "jaxcache"), "--cache", str(tmp_path / "cond"), *extra])


def _last_err(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


def _snapshot(folder):
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(folder) for f in fs}


# ------------------------------------------------------------------------------------------ --out safety


def test_non_empty_out_is_refused_and_kept(tmp_path, capsys, no_models):
    video, mask = _clip(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "x.bin").write_bytes(b"\0\1")
    before = _snapshot(out)
    for extra in ([], ["--overwrite"]):
        rc = _main(video, [mask], str(out), *extra, tmp_path=tmp_path)
        err = _last_err(capsys)
        assert rc == 2 and err.startswith("error: --out") and "not empty" in err and "not an earlier output" in err
        assert _snapshot(out) == before


def test_earlier_output_needs_overwrite(tmp_path, capsys, no_models):
    video, mask = _clip(tmp_path)
    out = tmp_path / "layers"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"tool": decompose.TOOL}))
    (out / "background.mp4").write_bytes(b"old")
    before = _snapshot(out)
    rc = _main(video, [mask], str(out), tmp_path=tmp_path)
    err = _last_err(capsys)
    assert rc == 2 and "--overwrite" in err and _snapshot(out) == before
    # With --overwrite the checks pass and the next step is building the models.
    with pytest.raises(ModelsBuilt):
        _main(video, [mask], str(out), "--overwrite", tmp_path=tmp_path)
    assert _snapshot(out) == before


def test_out_dot_and_ancestors_refused(tmp_path, capsys, monkeypatch, no_models):
    video, mask = _clip(tmp_path)
    work = tmp_path / "work"
    (work / "deep").mkdir(parents=True)
    (work / "input.mp4").write_bytes(b"mine")
    monkeypatch.chdir(work / "deep")
    before = _snapshot(work)
    for out in (".", "..", str(tmp_path)):
        rc = _main(video, [mask], out, "--overwrite", tmp_path=tmp_path)
        err = _last_err(capsys)
        assert rc == 2 and "current folder" in err, err
    assert _snapshot(work) == before


@pytest.mark.parametrize("case", ["file", "under_file"])
def test_out_that_is_not_a_folder(tmp_path, capsys, no_models, case):
    video, mask = _clip(tmp_path)
    f = tmp_path / "afile"
    f.write_text("keep")
    out = str(f) if case == "file" else str(f / "layers")
    rc = _main(video, [mask], out, tmp_path=tmp_path)
    err = _last_err(capsys)
    assert rc == 2 and "is a file" in err and f.read_text() == "keep"


def test_input_inside_out_is_not_replaced(tmp_path, capsys, no_models):
    out = tmp_path / "layers"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"tool": decompose.TOOL}))
    video, mask = _clip(out)
    rc = _main(video, [mask], str(out), "--overwrite", tmp_path=tmp_path)
    assert rc == 2 and "holds the input" in _last_err(capsys)
    assert os.path.isdir(video)


def test_late_failure_keeps_results(tmp_path):
    """Something else fills --out while the clip runs: the finished files stay in the named temporary folder."""
    out = tmp_path / "layers"

    def write(folder):
        with open(os.path.join(folder, "result.txt"), "w") as f:
            f.write("done")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    with pytest.raises(decompose.InputError, match="kept in") as e:
        decompose.publish(str(out), write)
    kept = str(e.value).rsplit("kept in ", 1)[1]
    assert open(os.path.join(kept, "result.txt")).read() == "done"
    assert (out / "theirs.txt").read_text() == "theirs"


def test_failure_while_writing_leaves_nothing(tmp_path):
    def write(folder):
        open(os.path.join(folder, "half.bin"), "wb").close()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        decompose.publish(str(tmp_path / "layers"), write)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ numbers, sizes


@pytest.mark.parametrize("flag,value,words", [("--steps", "0", "at least 1"), ("--steps", "-1", "at least 1"),
                                              ("--tau", "2", "[0, 1]"), ("--tau", "-0.1", "[0, 1]"),
                                              ("--height", "8", "[16, 2048]"), ("--max-frames", "0", "at least 1")])
def test_numbers_out_of_range(tmp_path, capsys, no_models, flag, value, words):
    video, mask = _clip(tmp_path)
    rc = _main(video, [mask], str(tmp_path / "out"), flag, value, tmp_path=tmp_path)
    err = _last_err(capsys)
    assert rc == 2 and err.startswith(f"error: {flag} {value}") and words in err
    assert not os.path.exists(tmp_path / "out")


def test_aspect_limit(tmp_path, capsys, no_models):
    video, mask = _clip(tmp_path, frames=2, h=64, w=2048)
    rc = _main(video, [mask], str(tmp_path / "out"), "--height", "480", tmp_path=tmp_path)
    err = _last_err(capsys)
    # 2048x64 at height 480: width 2048 * 480 / 64 = 15360 (a multiple of 16 already).
    assert rc == 2 and "15360x480" in err and "4:1" in err


def test_missing_weights_reported_before_the_video(tmp_path, capsys, no_models):
    rc = decompose.main(["--video", str(tmp_path / "no_video.mp4"), "--masks", str(tmp_path / "no_mask"),
                         "--out", str(tmp_path / "out"), "--dit", str(tmp_path / "no_dit"), "--vae", "v", "--umt5",
                         "u", "--clip", "c", "--tokenizer", "t", "--effect-lora", "e", "--quality-lora", "q"])
    err = _last_err(capsys)
    assert rc == 2 and err.startswith("error: --dit") and "no such file" in err
    rc = decompose.main(["--video", "v.mp4", "--masks", "m", "--out", str(tmp_path / "out"), "--vae", "v"])
    err = _last_err(capsys)
    assert rc == 2 and "missing --dit" in err and "--effect-lora" in err


# ------------------------------------------------------------------------------------------ odd input


def test_video_cut_short_blames_the_video(tmp_path, capsys, no_models, echo_models):
    video, mask = _clip(tmp_path, frames=4, mask_frames=8)
    rc = _main(video, [mask], str(tmp_path / "out"), tmp_path=tmp_path)
    err = _last_err(capsys)
    assert rc == 2 and err.startswith(f"error: video {video} has 4 frames") and "shorter than its masks" in err


def test_cut_mkv_blames_the_video(tmp_path, capsys, echo_models):
    """The first half of an mkv decodes to 7 of 16 frames; the masks still have 16."""
    rng = np.random.default_rng(0)
    path = str(tmp_path / "v.mkv")
    write_video(path, (rng.random((16, 32, 48, 3)) * 255).astype(np.uint8), 12)
    data = open(path, "rb").read()
    cut = str(tmp_path / "cut.mkv")
    open(cut, "wb").write(data[: len(data) // 2])
    mask = str(tmp_path / "mask")
    write_frames(mask, np.full((16, 32, 48), 255, np.uint8) * (np.arange(48) < 20))
    rc = _main(cut, [mask], str(tmp_path / "out"), tmp_path=tmp_path)
    err = _last_err(capsys)
    assert rc == 2 and err.startswith(f"error: video {cut} has 7 frames but its masks have 16"), err


def test_decoded_fewer_than_the_header_says(tmp_path, monkeypatch):
    import dataclasses

    from omnijax.io import video as vio

    path = str(tmp_path / "v.mp4")
    write_video(path, np.zeros((6, 32, 48, 3), np.uint8), 12)
    real = vio.probe
    monkeypatch.setattr(vio, "probe", lambda p, **kw: dataclasses.replace(real(p, **kw), num_frames=12))
    with pytest.raises(vio.VideoError, match=r"only 6 of its 12 frames could be decoded \(the file is truncated"):
        vio.read_video(path)
    assert vio.read_video(path, max_frames=5)[0].shape[0] == 5  # asking for fewer is no error


def test_full_frame_and_duplicate_masks_warn(tmp_path, capsys):
    video, mask = _clip(tmp_path)
    full = str(tmp_path / "full")
    write_frames(full, np.full((5, 32, 48), 255, np.uint8))
    copy = str(tmp_path / "copy")
    write_frames(copy, read_video(mask)[0])
    decompose.read_inputs(video, [full, mask, copy], None)
    err = capsys.readouterr().err
    assert f"mask {full} covers every pixel" in err
    assert f"masks {mask} and {copy} are the same" in err


def test_same_mask_twice_warns_before_models(tmp_path, capsys, no_models):
    video, mask = _clip(tmp_path)
    with pytest.raises(ModelsBuilt):
        _main(video, [mask, mask], str(tmp_path / "out"), tmp_path=tmp_path)
    assert f"mask {mask} is given twice" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ batches, preview


def test_batch_goes_on_after_a_failed_clip(tmp_path, capsys, echo_models):
    ok_v, ok_m = _clip(tmp_path, "a")
    bad_v, bad_m = _clip(tmp_path, "b", frames=5, mask_frames=3)     # fails when read (after the models)
    ok2_v, ok2_m = _clip(tmp_path, "c", frames=3, h=16, w=64)
    args = ["--video", ok_v, "--masks", ok_m, "--out", str(tmp_path / "oa"),
            "--video", bad_v, "--masks", bad_m, "--out", str(tmp_path / "ob"),
            "--video", str(tmp_path / "missing.mp4"), "--masks", ok_m, "--out", str(tmp_path / "oc"),  # at check
            "--video", ok_v, "--masks", ok_m, ok_m, ok_m, "--out", str(tmp_path / "oe"),  # fails in the models
            "--video", ok2_v, "--masks", ok2_m, ok2_m, "--out", str(tmp_path / "od")]
    rc = decompose.main([*args, "--model", "tiny", "--no-compile-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and len(echo_models) == 1  # models built once for the batch
    assert "2 of 5 clips written, 3 failed" in err.strip().splitlines()[-1]
    assert f"error: clip {bad_v}: mask {bad_m} has 3 frames" in err and "missing.mp4: no such" in err
    assert f"error: clip {ok_v}: RuntimeError: out of memory" in err
    for out, (video, n) in ((tmp_path / "oa", (ok_v, 5)), (tmp_path / "od", (ok2_v, 3))):
        report = json.loads((out / "report.json").read_text())
        assert report["tool"] == decompose.TOOL and report["frames"] == n
        bg, _ = read_video(str(out / "background.mp4"))
        src, _ = read_video(video)
        assert np.abs(bg.astype(float) - src).mean() < 6  # the echo background is the input (3.5 measured)
    assert not any((tmp_path / o).exists() for o in ("ob", "oc", "oe"))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]


def test_batch_reads_one_clip_ahead(tmp_path, monkeypatch, echo_models):
    """The next clip is read while the current one runs (so a batch does not wait for reading), and never more
    than one clip ahead (so a long batch does not fill the memory)."""
    clips = [_clip(tmp_path, name) for name in "abc"]
    started, ahead_while_running, ahead_at_start = [], [], []
    real_read, real_clip = decompose.read_inputs, decompose.start_clip

    def read(video, masks, max_frames):
        started.append(video)
        return real_read(video, masks, max_frames)

    def start_clip(clip, *a, **k):
        i = [v for v, _ in clips].index(clip.video)
        ahead_at_start.append(len(started) - (i + 1))
        finish = real_clip(clip, *a, **k)
        want = min(i + 2, len(clips))
        deadline = time.monotonic() + 5
        while len(started) < want and time.monotonic() < deadline:
            time.sleep(0.01)
        ahead_while_running.append(len(started) >= want)
        return finish

    monkeypatch.setattr(decompose, "read_inputs", read)
    monkeypatch.setattr(decompose, "start_clip", start_clip)
    args = _batch_args(tmp_path, "abc", clips)
    assert decompose.main([*args, "--model", "tiny", "--no-compile-cache"]) == 0
    assert started == [v for v, _ in clips]  # in order, each once
    assert ahead_while_running == [True, True, True]
    assert max(ahead_at_start) <= 1


def test_batch_dispatches_the_next_clip_while_taking_a_result(tmp_path, monkeypatch, echo_models):
    """Clip i's result is taken (waited for, copied back, written) on another thread while clip i+1 is dispatched,
    so that the device never waits for the host between clips; no more than IN_FLIGHT clips are dispatched and not
    yet taken; a clip whose result fails does not stop the others."""
    names = "abcd"
    clips = [_clip(tmp_path, name) for name in names]
    events, lock, real_clip = [], threading.Lock(), decompose.start_clip
    next_started, in_flight = [], []

    def log(event):
        with lock:
            events.append(event)

    def start_clip(clip, *a, **k):
        name = os.path.basename(os.path.dirname(clip.video))
        with lock:
            # dispatched and not yet taken, this one included
            starts, taken = (sum(e.startswith(w) for e in events) for w in ("start", "taken"))
            in_flight.append(1 + starts - taken)
        log(f"start {name}")
        finish = real_clip(clip, *a, **k)

        def logged():
            i = names.index(name)
            if i + 1 < len(names):  # the next clip is dispatched while this result is still being waited for
                deadline = time.monotonic() + 5
                while f"start {names[i + 1]}" not in events and time.monotonic() < deadline:
                    time.sleep(0.01)
                next_started.append(f"start {names[i + 1]}" in events)
            time.sleep(0.2)  # a slow device: an unbounded loop would dispatch every clip meanwhile
            log(f"taken {name}")
            if name == "b":
                raise RuntimeError("device failure (a stand-in)")
            return finish()
        logged.pending = finish.pending
        return logged

    monkeypatch.setattr(decompose, "start_clip", start_clip)
    args = _batch_args(tmp_path, names, clips)
    assert decompose.main([*args, "--model", "tiny", "--no-compile-cache"]) == 1
    assert next_started == [True, True, True]
    assert max(in_flight) <= decompose.IN_FLIGHT
    assert [e for e in events if e.startswith("taken")] == [f"taken {n}" for n in names]  # in order
    assert all((tmp_path / f"o{n}" / "report.json").exists() for n in "acd")
    assert not (tmp_path / "ob").exists()


def test_interrupt_stops_the_clips_in_flight_from_being_written(tmp_path, monkeypatch, echo_models):
    """Ctrl-C while a batch runs (here while clip b is dispatched, clip a still running): the interrupt is raised and
    the clip in flight is not written."""
    names = "abc"
    clips = [_clip(tmp_path, name) for name in names]
    real_clip = decompose.start_clip

    def start_clip(clip, *a, **k):
        name = os.path.basename(os.path.dirname(clip.video))
        if name == "b":
            raise KeyboardInterrupt
        finish = real_clip(clip, *a, **k)

        def slow():
            time.sleep(1.0)  # a device still busy with this clip
            return finish()
        slow.pending = finish.pending
        return slow

    monkeypatch.setattr(decompose, "start_clip", start_clip)
    args = _batch_args(tmp_path, names, clips)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        decompose.main([*args, "--model", "tiny", "--no-compile-cache"])
    assert time.monotonic() - start < 8
    assert not any((tmp_path / f"o{n}").exists() for n in names)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_failed_clips_are_not_kept_in_memory(tmp_path, monkeypatch, echo_models):
    """A long batch whose clips fail (on the device, when their result is taken) holds no earlier clip than the one
    before: neither the failures' tracebacks nor the chain of stage clocks keep a clip's arrays alive."""
    from omnijax.omnimatte import decompose as core

    names = "abcd"
    clips = [_clip(tmp_path, n) for n in names]
    refs, alive_at = {}, {}
    real_read, real_start, real_result = decompose.read_inputs, decompose.start_clip, core.PendingLayers.result

    def read(video, masks, max_frames):
        out = real_read(video, masks, max_frames)
        refs[os.path.basename(os.path.dirname(video))] = weakref.ref(out[0])
        return out

    def start_clip(clip, *a, **k):
        name = os.path.basename(os.path.dirname(clip.video))
        time.sleep(0.3)  # the clips before the last one are taken by now
        gc.collect()
        alive_at[name] = sorted(n for n, r in refs.items() if r() is not None and n < name)
        return real_start(clip, *a, **k)

    def result(self):
        real_result(self)
        raise RuntimeError("device failure (a stand-in)")

    monkeypatch.setattr(decompose, "read_inputs", read)
    monkeypatch.setattr(decompose, "start_clip", start_clip)
    monkeypatch.setattr(core.PendingLayers, "result", result)
    args = _batch_args(tmp_path, names, clips)
    assert decompose.main([*args, "--model", "tiny", "--no-compile-cache"]) == 1
    assert set(alive_at) == set(names)
    assert all(set(alive_at[n]) <= set(names[max(0, i - 1):i]) for i, n in enumerate(names)), alive_at


def test_model_failure_is_reported_without_waiting_for_the_read_ahead(tmp_path, monkeypatch):
    """The first clip is read while the models load; a load failure is raised at once, not after that read."""
    video, mask = _clip(tmp_path, "a")

    def slow_read(*a):
        time.sleep(3)
        raise AssertionError("never used")

    def build(args):
        raise ModelsBuilt("checkpoint unreadable")

    monkeypatch.setattr(decompose, "read_inputs", slow_read)
    monkeypatch.setattr(decompose, "build_decomposer", build)
    start = time.monotonic()
    with pytest.raises(ModelsBuilt):
        _main(video, [mask], str(tmp_path / "out"), tmp_path=tmp_path)
    assert time.monotonic() - start < 2


def test_manifest(tmp_path, capsys, echo_models):
    v, m = _clip(tmp_path, "a")
    manifest = tmp_path / "clips.json"
    manifest.write_text(json.dumps([{"video": "a/video", "masks": ["a/mask"], "out": "out_a"}]))
    rc = decompose.main(["--manifest", str(manifest), "--model", "tiny", "--no-compile-cache"])
    assert rc == 0 and (tmp_path / "out_a" / "report.json").exists()
    manifest.write_text(json.dumps([{"video": "a/video", "out": "x"}]))
    rc = decompose.main(["--manifest", str(manifest), "--model", "tiny", "--no-compile-cache"])
    assert rc == 2 and "entry 0 is not" in _last_err(capsys)


def test_umt5_not_loaded_when_its_embedding_is_cached(tmp_path, monkeypatch):
    """Second run with the same sources: the empty prompt's embedding comes from the cache and umT5 is never
    loaded. Only umT5 is real here; the other models are stand-ins (their loading is not under test)."""
    import argparse
    import types

    from converters import registry
    from omnijax.omnimatte import branch
    from omnijax.omnimatte import decompose as core

    real_load, loaded = registry.load, []

    def load(kind, source, **kw):
        loaded.append(kind)
        if kind == "umt5":
            return real_load(kind, source, **kw)
        return None, types.SimpleNamespace(config=types.SimpleNamespace(num_layers=2))

    monkeypatch.setattr(registry, "load", load)
    monkeypatch.setattr(branch, "EasyOmnimatte", lambda dit, expert, rngs: None)
    monkeypatch.setattr(core, "Decomposer", lambda *a, **kw: types.SimpleNamespace(conditioner=a[3]))
    args = argparse.Namespace(model="tiny", seed=0, cache=str(tmp_path / "cond"), prompt="", dtype="f32",
                              attention="auto")
    first = decompose.build_decomposer(args)
    assert sorted(loaded) == sorted(["wan_dit", "wan_vae", "umt5", "wan_clip"]) and first.umt5_loaded
    # The reference: the embedding the real encoder computes (cache bypassed).
    encoder = real_load("umt5", "tiny", dtype="f32", seed=2)[1]
    tokenizer = os.path.join(args.cache, "tiny_tokenizer")  # built by the first run
    want = registry.conditioner(None, text_encoder=encoder, tokenizer=tokenizer).text([""])[0]
    loaded.clear()
    second = decompose.build_decomposer(args)
    assert "umt5" not in loaded and not second.umt5_loaded and second.conditioner.text_encoder is None
    np.testing.assert_allclose(second.conditioner.text([""])[0], want, rtol=1e-6)
    # Another prompt is not cached: umT5 is loaded again.
    loaded.clear()
    decompose.build_decomposer(argparse.Namespace(**{**vars(args), "prompt": "a cat"}))
    assert "umt5" in loaded
