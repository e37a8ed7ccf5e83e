"""benchmarks/learn_diffdecompose.py --tiny, a couple of steps: the three stages run, write the four outputs, skip
what the workdir already holds, and the baseline column is the composite's own error (a float64 formula here)."""

import json
import math
import os

import numpy as np

from benchmarks import learn_diffdecompose as learn


def test_tiny_learning_check_runs_resumes_and_prints_the_table(tmp_path, capsys):
    wd, out = str(tmp_path / "wd"), str(tmp_path / "out")
    args = ["--tiny", "--workdir", wd, "--out", out, "--steps", "2", "--sampler-steps", "1", "--vae-steps", "2",
            "--num-eval", "2", "--eval-batch", "2", "--sheet-rows", "1", "--mark-size", "256,512"]
    learn.main(args)
    assert sorted(os.listdir(out)) == ["learn_diffdecompose.json", "log.txt", "loss.png", "sheet.png"]
    with open(os.path.join(out, learn.RESULT)) as f:
        r = json.load(f)
    assert [s for s, _ in r["train"]["curve"]] == [1, 2]
    assert all(math.isfinite(v) for _, v in r["train"]["curve"])
    assert r["eval"]["n"] == 2 and r["settings"]["steps"] == 2 and r["settings"]["mark_size"] == [256, 512]
    # Baseline: the composite taken as the background, RMSE x 256 over the held-out samples, recomputed here.
    from configs import diffdecompose
    from data.alphablend import dataset_from_config

    cfg = diffdecompose.get_config("learn,runlocal")
    cfg.input.watermark_size = (256, 512)  # --mark-size: boxes of 16-32 px at 32 px
    data = dataset_from_config(cfg.input, seed=learn.HELD_OUT_SEED, length=2)
    ref = np.mean([np.sqrt(np.mean((data[i]["composite"].astype(np.float64)
                                    - data[i]["background"].astype(np.float64)) ** 2)) * 256 for i in range(2)])
    np.testing.assert_allclose(r["eval"]["mean"]["baseline_bg_rmse"], ref, rtol=1e-6)
    assert all(math.isfinite(v) for k, v in r["eval"]["mean"].items() if "masked" not in k)
    # A rerun finds every stage done in the workdir.
    capsys.readouterr()
    learn.main(args)
    log = capsys.readouterr().out
    assert "exists, skipped" in log and "holds step 2, skipped" in log and "holds these settings, skipped" in log
    with open(os.path.join(out, learn.RESULT)) as f:
        assert json.load(f)["eval"] == r["eval"]
    learn.main(["--markdown", os.path.join(out, learn.RESULT)])
    table = capsys.readouterr().out
    assert "| baseline: the composite |" in table and "trained model" in table
