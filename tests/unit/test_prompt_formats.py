"""LongLive's prompt formats beside ours (inference/prompts.py): one-prompt-per-line .txt files and case folders of
per-shot caption JSON files with shot_durations.txt, scene-cut prefix at shot boundaries; bad input; the
generate pipeline starts a shot (with KV recache) at every scene cut of a case folder."""
from __future__ import annotations

import json

import pytest

from megatron_longlive.inference.prompts import SCENE_CUT_PREFIX, check_schedule, load_prompt_file

P = SCENE_CUT_PREFIX


def _starts(segments):
    return [(s.start_chunk, s.prompt, s.new_shot) for s in segments]


def _case(folder, captions, durations=None, first=0):
    folder.mkdir(parents=True)
    for i, caption in enumerate(captions, first):
        (folder / f"{i}.json").write_text(json.dumps({"caption": caption, "other": 1}))
    (folder / "global.json").write_text(json.dumps({"caption": "ignored"}))
    if durations is not None:
        (folder / "shot_durations.txt").write_text(durations)
    return folder


def test_longlive_txt_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("A dog runs: fast.\n\n   \nA cat sleeps.\n# a comment\nA bird sings.\n")
    assert _starts(load_prompt_file(path)) == [(0, "A dog runs: fast.", False)]
    # blank lines and comments are skipped, as LongLive skips blank lines: index counts prompt lines
    assert _starts(load_prompt_file(path, index=1)) == [(0, "A cat sleeps.", False)]
    seg = load_prompt_file(path, index=2)[0]
    assert seg.prompt == "A bird sings." and seg.where.endswith("prompts.txt:6")
    with pytest.raises(ValueError, match=r"prompts.txt: prompt index 3 out of range \(the file holds 3 prompt lines"):
        load_prompt_file(path, index=3)
    # our 'CHUNK: prompt' form is recognised by its first line and stays strict
    ours = tmp_path / "ours.txt"
    ours.write_text("0: a\n3: b\n")
    assert _starts(load_prompt_file(ours)) == [(0, "a", False), (3, "b", False)]
    ours.write_text("0: a\nb without a chunk\n")
    with pytest.raises(ValueError, match=r"ours.txt:2: expected 'START_CHUNK: prompt'"):
        load_prompt_file(ours)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty.txt: no prompts found"):
        load_prompt_file(empty)


def test_case_folder_with_shot_durations(tmp_path):
    root = tmp_path / "cases"
    _case(root / "caption" / "b_case", ["x"], "4")
    _case(root / "caption" / "a_case", ["A dog runs.", "A cat sleeps.", "A bird sings."], "2, 6\n4\n")
    segs = load_prompt_file(root, num_chunks=12)                  # index 0 = a_case (sorted by name)
    assert _starts(segs) == [(0, "A dog runs.", False), (2, P + "A cat sleeps.", True), (8, P + "A bird sings.", True)]
    assert "1.json (shot 1, chunks 2..7)" in segs[1].where
    assert check_schedule(segs, 12) == segs
    assert _starts(load_prompt_file(root, index=1)) == [(0, "x", False)]
    # the case folder itself, DIR/<case>/ without caption/, and a custom prefix
    assert load_prompt_file(root / "caption" / "a_case") == segs
    assert load_prompt_file(root / "caption", num_chunks=12) == segs
    custom = load_prompt_file(root, scene_cut_prefix="[CUT] ")
    assert [s.prompt for s in custom] == ["A dog runs.", "[CUT] A cat sleeps.", "[CUT] A bird sings."]
    # a shot past the video is refused by the schedule check, naming the shot's file
    with pytest.raises(ValueError, match=r"2.json \(shot 2, chunks 8..11\): start chunk 8 is beyond the video"):
        check_schedule(segs, 8)


def test_case_folder_without_durations_numbered_from_one(tmp_path):
    case = _case(tmp_path / "case", ["a", "b", "c"], first=1)
    # even split of the video's chunks, the remainder to the first shots (LongLive's even durations)
    assert _starts(load_prompt_file(case, num_chunks=11)) == [(0, "a", False), (4, P + "b", True),
                                                             (8, P + "c", True)]
    assert [s.start_chunk for s in load_prompt_file(case, num_chunks=11, chunks_per_shot=2)] == [0, 2, 4]
    with pytest.raises(ValueError, match=r"case: no shot_durations.txt, so the shots split the video evenly"):
        load_prompt_file(case)
    with pytest.raises(ValueError, match=r"case: 3 shots do not fit in 2 chunks"):
        load_prompt_file(case, num_chunks=2)


def test_case_folder_bad_input(tmp_path):
    gap = _case(tmp_path / "gap", ["a", "b", "c"])
    (gap / "1.json").unlink()
    with pytest.raises(ValueError, match=r"gap: shot caption numbering has a gap: 1.json is missing \(found 0.json, 2.json"):
        load_prompt_file(gap, num_chunks=8)
    late = _case(tmp_path / "late", ["a", "b"], first=2)       # numbering must start at 0 or 1
    with pytest.raises(ValueError, match=r"late: shot caption numbering has a gap: 1.json is missing"):
        load_prompt_file(late, num_chunks=8)
    mismatch = _case(tmp_path / "mismatch", ["a", "b", "c"], "4 4")
    with pytest.raises(ValueError, match=r"shot_durations.txt: 2 durations for 3 shots"):
        load_prompt_file(mismatch)
    (mismatch / "shot_durations.txt").write_text("4, 0, 2")
    with pytest.raises(ValueError, match=r"shot_durations.txt: durations must be positive integers"):
        load_prompt_file(mismatch)
    (mismatch / "shot_durations.txt").write_text("4, two, 2")
    with pytest.raises(ValueError, match=r"shot_durations.txt: durations must be positive integers"):
        load_prompt_file(mismatch)
    blank = _case(tmp_path / "blank", ["a", "   "], "2 2")
    with pytest.raises(ValueError, match=r"blank/1.json: empty caption"):
        load_prompt_file(blank)
    broken = _case(tmp_path / "broken", ["a"], "2")
    (broken / "0.json").write_text('{"caption": "a"')
    with pytest.raises(ValueError, match=r"broken/0.json: not valid JSON"):
        load_prompt_file(broken)
    (broken / "0.json").write_text('{"text": "a"}')
    with pytest.raises(ValueError, match=r'broken/0.json: expected a JSON object with a "caption" field'):
        load_prompt_file(broken)
    (broken / "0.json").write_text('{"caption": "a"}')
    (broken / "notes.json").write_text("{}")
    with pytest.raises(ValueError, match=r"broken/notes.json: shot caption files are numbered"):
        load_prompt_file(broken)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"nothing: a prompt directory needs per-shot caption JSON files"):
        load_prompt_file(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"prompt index 9 out of range \(it holds"):
        load_prompt_file(tmp_path, index=9)


def test_generate_starts_a_shot_at_each_scene_cut(tmp_path, tiny_cfg):
    """generate_video with a case folder == the engine driven by hand with new shot + recache at the scene cut."""
    import torch

    from megatron_longlive.config import load_config
    from megatron_longlive.inference.engine import StreamingEngine
    from megatron_longlive.inference.pipeline import generate_video, load_encoders

    from generate_helpers import tiny_dit

    case = _case(tmp_path / "case", ["a red square", "a blue circle"], "2 2")
    cfg = load_config(None, ["infer.num_chunks=4", "infer.chunk_frames=1", "infer.sink_frames=1",
                             "infer.shot_sink_frames=1", "infer.window_frames=3", "infer.height=32", "infer.width=32",
                             "infer.denoising_steps=[1000,500]"])
    model = tiny_dit(tiny_cfg).eval()
    vae, text = load_encoders(cfg)
    segs = load_prompt_file(case, num_chunks=4)
    got = generate_video(cfg, model, segs, None, vae, text, progress=False).latents
    embeds = {0: text.encode(["a red square"]), 2: text.encode([P + "a blue circle"])}
    for cut in (True, False):          # by hand: the scene cut starts a shot and recaches under the new prompt
        engine = StreamingEngine(model, cfg.infer, (4, 4))
        gen = torch.Generator().manual_seed(cfg.infer.seed)
        ref = []
        for c in range(4):
            if c in embeds:
                engine.set_prompt(embeds[c], new_shot=cut and c == 2, recache=cut and c == 2)
            ref.append(engine.generate_chunk(torch.randn(1, 16, 1, 4, 4, generator=gen)))
        ref = torch.cat(ref, dim=2)
        if cut:
            assert engine.shot_starts == [0, 2]
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        else:                                                 # a plain switch gives other chunks after the cut
            assert (got[:, :, 2:] - ref[:, :, 2:]).abs().max() > 1e-4
