"""Loading videos and latent dumps for evaluation, including the errors users see on bad files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from megatron_longlive.eval import testvideos as tv
from megatron_longlive.eval.video_io import is_latent_file, read_latents, read_video
from megatron_longlive.inference.video_writer import write_mp4


def test_read_video_roundtrip(tmp_path):
    frames = tv.to_uint8(tv.static(3, 32, 48))
    path = write_mp4(tmp_path / "a.mp4", frames, fps=8)
    out = read_video(path)
    assert out.shape == (3, 32, 48, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - frames).mean() < 8  # yuv420p chroma subsampling of a colour texture
    assert read_video(path, max_frames=2).shape[0] == 2


def test_unreadable_video_names_the_file(tmp_path):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ValueError, match="garbage.mp4: not a readable video"):
        read_video(bad)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")


def test_read_latents_layouts(tmp_path):
    z = torch.randn(4, 5, 6, 7)  # [C, T, h, w]
    torch.save(z, tmp_path / "a.pt")
    torch.save({"latents": z[None], "step": torch.tensor(3)}, tmp_path / "b.pt")
    save_file({"latents": z.contiguous()}, str(tmp_path / "c.safetensors"))
    for name in ("a.pt", "b.pt", "c.safetensors"):
        assert is_latent_file(tmp_path / name)
        out = read_latents(tmp_path / name)
        assert out.shape == (5, 4, 6, 7)
        torch.testing.assert_close(out, z.permute(1, 0, 2, 3))
    torch.testing.assert_close(read_latents(tmp_path / "a.pt", layout="TCHW"), z)


def test_bad_latent_files(tmp_path):
    torch.save({"a": torch.zeros(1, 2, 3, 4), "b": torch.zeros(1, 2, 3, 4)}, tmp_path / "ambiguous.pt")
    with pytest.raises(ValueError, match="ambiguous.pt: cannot tell"):
        read_latents(tmp_path / "ambiguous.pt")
    torch.save(torch.zeros(3, 4), tmp_path / "flat.pt")
    with pytest.raises(ValueError, match="flat.pt: latents must be 4-D"):
        read_latents(tmp_path / "flat.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="junk.safetensors: not a readable latent dump"):
        read_latents(tmp_path / "junk.safetensors")
