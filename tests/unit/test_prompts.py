"""Prompt schedules from the command line and from prompt files; bad input names the line and the fix."""
from __future__ import annotations

import json

import pytest

from megatron_longlive.inference.prompts import (check_schedule, load_prompt_file, parse_cli_prompts,
                                                 prompt_changes)


def _starts(segments):
    return [(s.start_chunk, s.prompt) for s in segments]


def test_cli_prompts():
    assert _starts(parse_cli_prompts(["a red square"])) == [(0, "a red square")]
    segs = parse_cli_prompts(["a red square@0", "a blue circle @ 4", "mail me@home@7"])
    assert _starts(segs) == [(0, "a red square"), (4, "a blue circle"), (7, "mail me@home")]
    with pytest.raises(ValueError, match=r"--prompt #2 .*needs its start chunk"):
        parse_cli_prompts(["a@0", "b"])
    with pytest.raises(ValueError, match=r"--prompt #1 .*empty prompt"):
        parse_cli_prompts(["  @0"])


def test_our_jsonl_yaml_txt_formats(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"start_chunk": 0, "prompt": "a"}\n\n{"start_chunk": 3, "prompt": "b"}\n')
    (tmp_path / "p.yaml").write_text("# two shots\n- {start_chunk: 0, prompt: a}\n- start_chunk: 3\n  prompt: b\n")
    (tmp_path / "p.txt").write_text("# comment\n0: a\n\n3:  b\n")
    for name in ("p.jsonl", "p.yaml", "p.txt"):
        assert _starts(load_prompt_file(tmp_path / name)) == [(0, "a"), (3, "b")], name


def test_longlive_jsonl(tmp_path):
    path = tmp_path / "ll.jsonl"
    path.write_text(json.dumps({"prompts": ["a", "b", "c"], "switch_frame_indices": [6, 12]}) + "\n"
                    + json.dumps({"prompts": ["d", "e"]}) + "\n")
    assert _starts(load_prompt_file(path, chunk_frames=3)) == [(0, "a"), (2, "b"), (4, "c")]
    # LongLive gives the switch indices in its config: the caller passes them
    assert _starts(load_prompt_file(path, chunk_frames=3, index=1, switch_frame_indices=[9])) == [(0, "d"), (3, "e")]
    with pytest.raises(ValueError, match=r"ll.jsonl:2: 2 prompts need 1 switch_frame_indices"):
        load_prompt_file(path, chunk_frames=3, index=1)
    with pytest.raises(ValueError, match=r"ll.jsonl:1: switch frame 6 is not a multiple of infer.chunk_frames=4"):
        load_prompt_file(path, chunk_frames=4)
    with pytest.raises(ValueError, match="prompt index 5 out of range"):
        load_prompt_file(path, chunk_frames=3, index=5)


def test_bad_prompt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt: prompt file not found"):
        load_prompt_file(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"start_chunk": 0, "prompt": "a"}\n{"start_chunk": 2, "prompt": "b"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompt_file(bad)
    bad.write_text('{"start_chunk": 0, "prompt": "a"}\n{"start": 2, "text": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        load_prompt_file(bad)
    txt = tmp_path / "bad.txt"
    txt.write_text("0: a\n\nthree: b\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: expected 'START_CHUNK: prompt'"):
        load_prompt_file(txt)
    txt.write_text("0: a\n4:   \n")
    with pytest.raises(ValueError, match=r"bad.txt:2: empty prompt"):
        load_prompt_file(txt)
    yml = tmp_path / "bad.yaml"
    yml.write_text("- {start_chunk: 0, prompt: a}\n- {start_chunk: -1, prompt: b}\n")
    with pytest.raises(ValueError, match=r"bad.yaml:2: start chunk must be an integer >= 0"):
        load_prompt_file(yml)
    other = tmp_path / "p.csv"
    other.write_text("0,a\n")
    with pytest.raises(ValueError, match=r"p.csv: unknown prompt file format '.csv'"):
        load_prompt_file(other)


def test_check_schedule(tmp_path):
    txt = tmp_path / "s.txt"
    txt.write_text("0: a\n2: b\n2: c\n")
    with pytest.raises(ValueError, match=r"s.txt:3: segment starts at chunk 2, overlapping .*s.txt:2"):
        check_schedule(load_prompt_file(txt), num_chunks=8)
    txt.write_text("0: a\n9: b\n")
    with pytest.raises(ValueError, match=r"s.txt:2: start chunk 9 is beyond the video \(8 chunks"):
        check_schedule(load_prompt_file(txt), num_chunks=8)
    txt.write_text("1: a\n")
    with pytest.raises(ValueError, match=r"s.txt:1: the first segment starts at chunk 1"):
        check_schedule(load_prompt_file(txt), num_chunks=8)
    with pytest.raises(ValueError, match="no prompt given"):
        check_schedule([], 8)
    segs = check_schedule(parse_cli_prompts(["a@0", "b@5"]), 8)
    assert prompt_changes(segs) == {0: "a", 5: "b"}
