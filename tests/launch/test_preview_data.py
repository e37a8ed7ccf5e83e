"""launch/preview_data.py as a command (the sheet itself: tests/data/test_storage.py::test_data_sheet)."""

from data.preview import COLUMNS
from launch.preview_data import main
from omnijax.io.video import read_video


def test_preview_sheet(tmp_path):
    out = str(tmp_path / "sheet.png")
    assert main(["--out", out, "--n", "2", "--frames", "5", "--height", "32", "--width", "48"]) == 0
    img, _ = read_video(out)
    assert img.shape == (1, 16 + 2 * 36 + 4, len(COLUMNS) * 52 + 4, 3)
