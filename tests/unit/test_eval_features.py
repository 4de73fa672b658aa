"""Feature-based metrics: skipped with a reason when weights are absent; computed from local directories
when present (tiny randomly initialised CLIP / DINOv2 saved with save_pretrained stand in for real weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longlive.eval import features as F
from megatron_longlive.eval import testvideos as tv
from megatron_longlive.eval.report import EvalOptions, evaluate_video

WORDS = ["[UNK]", "[PAD]", "a", "red", "square", "blue", "circle", "moves", "right", "on", "black", "background"]


@pytest.fixture(scope="module")
def local_encoders(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=len(WORDS), max_position_embeddings=16, pad_token_id=1, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16))
    clip.save_pretrained(root / "clip")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"
                                         ).save_pretrained(root / "clip")
    crop = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPImageProcessor(**crop).save_pretrained(root / "clip")
    dino = transformers.Dinov2Model(transformers.Dinov2Config(image_size=32, patch_size=8, **small))
    dino.save_pretrained(root / "dino")
    transformers.BitImageProcessor(**crop).save_pretrained(root / "dino")
    return str(root / "clip"), str(root / "dino")


def test_missing_weights_are_skipped_with_reason(tmp_path):
    frames = tv.to_uint8(tv.static(3, 32, 32))
    opt = EvalOptions(metrics=("flicker", "subject_consistency", "background_consistency", "text_video_similarity"),
                      dino=str(tmp_path / "nope"), vbench=("subject_consistency",))
    by = {r.name: r for r in evaluate_video(frames, options=opt, video_path="v.mp4")}
    assert by["flicker"].value == 0.0
    assert "nope: not a local Hugging Face model directory" in by["subject_consistency"].skipped
    assert "--clip" in by["background_consistency"].skipped and "--clip" in by["text_video_similarity"].skipped
    if F.vbench_status() is not None:
        assert by["vbench/subject_consistency"].value is None and "vbench" in by["vbench/subject_consistency"].skipped


def test_consistency_known_answers(local_encoders):
    clip_dir, dino_dir = local_encoders
    static = tv.to_uint8(tv.static(4, 32, 32))
    r = F.subject_consistency(static, dino_dir)
    assert r.value == pytest.approx(1.0, abs=1e-6)  # identical frames -> identical features
    switch = F.subject_consistency(tv.to_uint8(tv.two_shots(8, 4, same_subject=False, height=32, width=32)), dino_dir)
    assert switch.value < r.value - 1e-3
    assert F.clip_metrics(static, clip_dir)[0].value == pytest.approx(1.0, abs=1e-6)


def test_consistency_formula():
    f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=-1)
    value, series = F.consistency(f)
    # t=1: (cos(f1,f0) + cos(f1,f0)) / 2 = 0; t=2: (cos(f2,f0)=0 + cos(f2,f1)=1) / 2 = 0.5
    assert series == [0.0, 0.5] and value == 0.25


def test_text_similarity_uses_each_shots_prompt(local_encoders):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    clip_dir, _ = local_encoders
    frames = tv.to_uint8(tv.two_shots(8, 4, same_subject=False, height=32, width=32))
    prompts = ["a red square moves right", "a blue circle on black background"]
    _, text = F.clip_metrics(frames, clip_dir, prompts, [0, 4])
    model = AutoModel.from_pretrained(clip_dir).eval()
    proc, tok = AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        for t, p in ((0, 0), (6, 1)):
            img = F._to_tensor(model.get_image_features(**proc(images=[frames[t]], return_tensors="pt")))
            txt = F._to_tensor(model.get_text_features(**tok([prompts[p]], return_tensors="pt")))
            expect = torch.nn.functional.cosine_similarity(img, txt).item()
            assert text.series[t] == pytest.approx(expect, abs=1e-5)
    assert text.value == pytest.approx(np.mean(text.series))
    with pytest.raises(ValueError, match="2 prompts for 1 shots"):
        F.clip_metrics(frames, clip_dir, prompts, [0])
