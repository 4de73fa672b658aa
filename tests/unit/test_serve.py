"""`longlive serve` on the tiny model through Starlette's TestClient: frames arrive, switches land on the next chunk
boundary (checked against `generate_video` with the same schedule), limits answer clearly, a second viewer is refused."""
from __future__ import annotations

import io
import json
import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from megatron_longlive.cli.main import main
from megatron_longlive.config import load_config
from megatron_longlive.inference.pipeline import generate_video, load_dit, load_encoders
from megatron_longlive.inference.prompts import PromptSegment
from megatron_longlive.models.wan.vae import WanVAE
from megatron_longlive.serve.app import Viewer, build_app
from megatron_longlive.serve.settings import ServeSettings
from megatron_longlive.inference.engine import StreamingEngine
from megatron_longlive.serve.stream import LiveStream, StreamingDecoder

RED, BLUE = "a red square slides right", "a blue circle moves down"


@pytest.fixture(scope="module")
def parts():
    cfg = load_config(None, ["infer.height=32", "infer.width=32", "infer.fps=8", "infer.num_chunks=5"])
    model = load_dit(cfg, None, seed=3)
    torch.nn.init.normal_(model.head.head.weight, std=0.05)
    vae, text = load_encoders(cfg)
    return cfg, model, vae, text


def _client(parts, **settings) -> tuple[TestClient, Viewer]:
    viewer = Viewer(*parts, ServeSettings(**settings))
    return TestClient(build_app(viewer)), viewer


def _start(ws, prompt=RED) -> dict:
    hello = ws.receive_json()
    assert hello["type"] == "hello" and (hello["width"], hello["height"]) == (32, 32)
    ws.send_json({"type": "start", "prompt": prompt})
    return hello


def test_streaming_decoder_equals_full_decode():
    vae = WanVAE.tiny()
    z = torch.randn(1, 16, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    full = vae.decode(z)
    dec = StreamingDecoder(vae)
    parts = [dec.decode(z[:, :, a:b]) for a, b in ((0, 1), (1, 3), (3, 4))]
    assert [p.shape[2] for p in parts] == [1, 8, 4]
    torch.testing.assert_close(torch.cat(parts, dim=2), full, rtol=0, atol=1e-5)   # fp32 rounding only


def test_live_stream_recache_and_new_shot_follow_the_engine(parts):
    """Default switches recache (and may start a shot): same result as driving the engine by hand."""
    cfg, model, vae, text = parts
    cfg = load_config(None, ["infer.height=32", "infer.width=32", "infer.window_frames=4", "infer.shot_sink_frames=1"])
    stream = LiveStream(cfg, model, vae, text, RED)
    assert stream.request_switch(RED) == 0            # nothing started: the first chunk takes it
    frames = [stream.next_chunk()[2] for _ in range(3)]
    assert stream.request_switch(BLUE, new_shot=True) == 3
    c, switch, last = stream.next_chunk()
    assert (c, switch) == (3, stream.switches[-1]) and switch.chunk == 3 and switch.new_shot
    assert [f.shape for f in frames + [last]] == [(1, 32, 32, 3)] + [(4, 32, 32, 3)] * 3
    engine = StreamingEngine(model, cfg.infer, (4, 4))
    gen = torch.Generator().manual_seed(cfg.infer.seed)
    engine.set_prompt(text.encode([RED]))
    ref = [engine.generate_chunk(torch.randn(1, 16, 1, 4, 4, generator=gen)) for _ in range(3)]
    engine.set_prompt(text.encode([BLUE]), recache=True, new_shot=True)
    ref.append(engine.generate_chunk(torch.randn(1, 16, 1, 4, 4, generator=gen)))
    torch.testing.assert_close(torch.cat(stream.latents, 2), torch.cat(ref, 2), rtol=0, atol=0)
    plain = StreamingEngine(model, cfg.infer, (4, 4))     # without recache/new shot chunk 3 differs
    gen = torch.Generator().manual_seed(cfg.infer.seed)
    plain.set_prompt(text.encode([RED]))
    for _ in range(3):
        plain.generate_chunk(torch.randn(1, 16, 1, 4, 4, generator=gen))
    plain.set_prompt(text.encode([BLUE]))
    assert not torch.equal(plain.generate_chunk(torch.randn(1, 16, 1, 4, 4, generator=gen)), ref[3])


def test_page_and_health(parts):
    client, _ = _client(parts)
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "/ws" in page.text
    health = client.get("/health").json()
    assert health["ok"] and health["active_sessions"] == 0 and health["fps"] == 8


def test_frames_arrive_and_switch_lands_on_next_chunk_boundary(parts):
    _, model, vae, text = parts
    # 4 fps, 0.1 s lead: chunk 2 starts ~1.1 s after the first frame, so the switch sent on that frame lands at 1 or 2
    cfg = load_config(None, ["infer.height=32", "infer.width=32", "infer.fps=4", "infer.num_chunks=4"])
    client, viewer = _client((cfg, model, vae, text), max_chunks=4, min_switch_interval_s=0, max_lead_s=0.1,
                             recache=False)
    events, apply_at, announced, at_ack = [], None, 0, None    # events: ("switch", chunk) / ("frame", chunk, index)
    with client.websocket_connect("/ws") as ws:
        _start(ws)
        while True:
            msg = ws.receive()
            if msg.get("bytes") is not None:
                chunk, index = struct.unpack(">II", msg["bytes"][:8])
                image = np.asarray(Image.open(io.BytesIO(msg["bytes"][8:])))
                assert image.shape == (32, 32, 3)
                events.append(("frame", chunk, index))
                if apply_at is None and chunk == 0:      # first frame on screen: switch the prompt
                    ws.send_json({"type": "prompt", "prompt": BLUE})
                    apply_at = -1
                continue
            data = json.loads(msg["text"])
            if data["type"] == "queued":
                assert data["prompt"] == BLUE
                apply_at, at_ack = data["apply_at"], announced
            elif data["type"] == "chunk":
                announced += 1
            elif data["type"] == "switch":
                events.append(("switch", data["chunk"], data["prompt"]))
            elif data["type"] == "end":
                break
    # the first chunk not started when the switch came: all before it were announced, but perhaps the last one
    assert 1 <= apply_at <= 3 and at_ack <= apply_at <= at_ack + 1, (apply_at, at_ack)
    frames = [e for e in events if e[0] == "frame"]
    assert [e[2] for e in frames] == list(range(1 + 4 * 3))           # 1 + 4 frames per later latent frame
    assert [e[1] for e in frames] == [0] + [c for c in range(1, 4) for _ in range(4)]
    switches = [e for e in events if e[0] == "switch"]
    assert switches == [("switch", 0, RED), ("switch", apply_at, BLUE)]
    # the switch message precedes exactly the frames of chunk apply_at
    at = events.index(switches[1])
    assert events[at - 1][1] == apply_at - 1 and events[at + 1][1] == apply_at
    # independent check: the streamed latents are those of the offline pipeline switching at apply_at
    streamed = torch.cat(viewer.streams[-1].latents, dim=2)
    ref = generate_video(cfg, model, [PromptSegment(0, RED), PromptSegment(apply_at, BLUE)], None, vae, text,
                         progress=False).latents
    torch.testing.assert_close(streamed, ref, rtol=0, atol=0)
    other = apply_at + 1 if apply_at + 1 < cfg.infer.num_chunks else apply_at - 1    # a switch one chunk off
    late = generate_video(cfg, model, [PromptSegment(0, RED), PromptSegment(other, BLUE)], None, vae, text,
                          progress=False).latents
    assert not torch.equal(streamed, late)


def test_limits_answer_with_clear_messages(parts):
    client, viewer = _client(parts, max_prompt_chars=30, min_switch_interval_s=60, max_chunks=2, max_lead_s=30)
    with client.websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_json({"type": "start", "prompt": "x" * 31})
        err = ws.receive_json()
        assert err["type"] == "error" and "too long: 31 characters, the limit is 30" in err["message"]
        ws.send_text("not json")
        assert "start" in ws.receive_json()["message"]
        ws.send_json({"type": "start", "prompt": RED})
        ws.send_json({"type": "prompt", "prompt": "   "})
        ws.send_json({"type": "prompt", "prompt": BLUE})
        ws.send_json({"type": "prompt", "prompt": "a green star"})
        ws.send_json({"type": "dance"})
        replies = []
        while len(replies) < 4:
            msg = ws.receive()
            if msg.get("text"):
                data = json.loads(msg["text"])
                if data["type"] in ("error", "queued"):
                    replies.append(data)
    assert "empty prompt" in replies[0]["message"]
    assert replies[1]["type"] == "queued" and replies[1]["prompt"] == BLUE
    assert replies[2]["type"] == "error" and "too many prompt switches" in replies[2]["message"] \
        and "one switch per 60 s" in replies[2]["message"]
    assert "unknown message type 'dance'" in replies[3]["message"]


def test_second_session_is_refused_then_admitted_after_the_first_ends(parts):
    client, viewer = _client(parts, max_chunks=2, max_lead_s=30)
    with client.websocket_connect("/ws") as first:
        _start(first)
        with client.websocket_connect("/ws") as second:
            busy = second.receive_json()
            assert busy["type"] == "busy" and "already streaming" in busy["message"] \
                and "--max-sessions 1" in busy["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                second.receive_json()
            assert closed.value.code == 1013
        while first.receive().get("text", "").find('"end"') < 0:
            pass
    deadline = time.monotonic() + 30
    while client.get("/health").json()["active_sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    with client.websocket_connect("/ws") as third:
        assert third.receive_json()["type"] == "hello"


def test_bad_geometry_is_reported_to_the_page(parts):
    _, model, vae, text = parts
    cfg = load_config(None, ["infer.height=36", "infer.width=32"])
    client, _ = _client((cfg, model, vae, text))
    with client.websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_json({"type": "start", "prompt": RED})
        err = ws.receive_json()
        assert err["type"] == "error" and "multiples of the VAE stride 8" in err["message"]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1011


def test_serve_cli_rejects_bad_limits(capsys):
    assert main(["serve", "--max-sessions", "0"]) == 2
    assert "--max-sessions must be >= 1" in capsys.readouterr().err
