"""The command line generator writes a readable video at the model's frame rate."""

import pytest
import torch

pytest.importorskip("diffusers")

import tiny  # noqa: E402
from vdit_core.generate import main  # noqa: E402
from vdit_core.video_io import read_video, write_video  # noqa: E402


def test_generate_writes_mp4(tmp_path, capsys):
    _, folder = tiny.reference_pipeline(tmp_path, "5b", "ddim")
    out = tmp_path / "out" / "video.mp4"
    code = main(["--model", str(folder), "--prompt", "a red circle moving right", "--frames", "9", "--height", "32",
                 "--width", "48", "--steps", "2", "--out", str(out)])
    assert code == 0
    frames, fps = read_video(out)
    assert frames.shape == (9, 32, 48, 3) and fps == 8
    assert f"wrote {out}" in capsys.readouterr().out


def test_generate_reports_bad_input_without_traceback(tmp_path, capsys):
    _, folder = tiny.reference_pipeline(tmp_path, "5b", "ddim")
    code = main(["--model", str(folder), "--prompt", "x", "--frames", "10", "--out", str(tmp_path / "x.mp4")])
    assert code == 2
    assert "nearest valid: 9 or 13" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "y.mp4")]) == 2


def test_video_roundtrip_and_decode_errors(tmp_path):
    frames = torch.rand(9, 32, 48, 3)
    for suffix in (".mp4", ".webm", ".gif"):
        path = write_video(tmp_path / f"v{suffix}", frames, fps=8)
        back, fps = read_video(path)
        assert back.shape[0] == 9 and back.shape[1:3] == (32, 48)
        assert abs(fps - 8) < 0.5
        assert (back - frames).abs().mean() < 0.25  # lossy codecs, random noise content
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="broken.mp4: cannot be decoded"):
        read_video(broken)
