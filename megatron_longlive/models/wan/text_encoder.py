"""umT5 text encoder wrapper (transformers' `UMT5EncoderModel` + tokenizer) producing Wan's text context.

`encode(prompts)` follows Wan / diffusers' `WanPipeline._get_t5_prompt_embeds` exactly: clean the prompt
(html-unescape, collapse whitespace), tokenize with the end-of-sequence token appended, pad/truncate to
`text_len`, run the encoder with the attention mask, then set every position after the real tokens to zero.
Result: [B, text_len, text_dim]. A prompt longer than `text_len` tokens is truncated to `text_len - 1` tokens
plus the end-of-sequence token (the tokenizer's truncation); an empty prompt encodes as the lone
end-of-sequence token followed by zeros.

`TextEncoder.tiny()` needs no download: a byte-level BPE tokenizer is trained in memory on a fixed corpus
(deterministic; byte-level, so any string tokenizes) and a small random umT5 encoder is built on top.
`from_pretrained(dir)` reads a local umT5-XXL directory (or a diffusers Wan pipeline root with
`text_encoder/` and `tokenizer/`); it never downloads.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

# Fixed training text of the tiny tokenizer (any text works; fixed text keeps the vocabulary deterministic).
_TINY_CORPUS = [
    "a cat walks along the beach at sunset, waves rolling in",
    "the camera pans slowly over a snowy mountain village at night",
    "a red car drives through the rain in a neon city street",
    "close-up of a dog running in the grass, shallow depth of field",
    "two people talk in a quiet cafe while the sun sets outside",
]


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning (diffusers' `prompt_clean`: html-unescape, ftfy if installed, collapse whitespace)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as _clean

    return _clean(text)


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer_object(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # T5's special ids: pad 0, eos 1, unk 2.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TINY_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerBase:
    """A real (byte-level BPE) tokenizer with T5's special tokens, trained in memory; no download."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tiny_tokenizer_object(vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


class TextEncoder(nn.Module):
    """Prompts -> Wan text context [B, text_len, text_dim] (zero after the real tokens)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int = 512):
        super().__init__()
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}. Fix: use e.g. 512 (Wan).")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.text_len = text_len

    @classmethod
    def tiny(cls, text_dim: int = 32, text_len: int = 16, seed: int = 0, num_layers: int = 2,
             num_heads: int = 2) -> "TextEncoder":
        """Random small umT5 encoder (same architecture family as umT5-XXL) with the in-memory tokenizer."""
        if text_dim % num_heads:
            raise ValueError(f"text_dim={text_dim} must be divisible by num_heads={num_heads}.")
        tokenizer = tiny_tokenizer()
        cfg = UMT5Config(vocab_size=len(tokenizer), d_model=text_dim, d_kv=text_dim // num_heads,
                         d_ff=2 * text_dim, num_layers=num_layers, num_heads=num_heads,
                         relative_attention_num_buckets=8, relative_attention_max_distance=32,
                         dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                         decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UMT5EncoderModel(cfg)
        return cls(model, tokenizer, text_len)

    @classmethod
    def from_pretrained(cls, path: str, text_len: int = 512, dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """Load umT5(-XXL) and its tokenizer from a local directory (never downloads).

        `path` may hold the encoder and tokenizer files together (google/umt5-xxl layout) or be a diffusers Wan
        pipeline root with `text_encoder/` and `tokenizer/` subfolders."""
        from transformers import AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"text encoder directory {path!r} not found. Fix: pass a local umT5-XXL "
                                    f"directory (e.g. google/umt5-xxl or <Wan-Diffusers>/text_encoder).")
        enc_dir, tok_dir = path, path
        if os.path.isdir(os.path.join(path, "text_encoder")):
            enc_dir = os.path.join(path, "text_encoder")
            tok_dir = os.path.join(path, "tokenizer")
        if not os.path.isfile(os.path.join(enc_dir, "config.json")):
            raise FileNotFoundError(f"{enc_dir!r} has no config.json. Fix: point to the umT5 encoder directory.")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"no tokenizer files in {tok_dir!r} ({e}). Fix: put the umT5 tokenizer "
                                    f"(tokenizer.json / spiece.model) there.") from e
        model = UMT5EncoderModel.from_pretrained(enc_dir, dtype=dtype, local_files_only=True)
        return cls(model, tokenizer, text_len)

    @property
    def text_dim(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, eos-terminated, padded/truncated token ids and mask, each [B, text_len]."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got one string. Fix: pass [prompt].")
        out = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=self.text_len,
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> [B, text_len, text_dim]; rows after each prompt's real tokens are exactly zero."""
        ids, mask = self.tokenize(prompts)
        device = next(self.model.parameters()).device
        hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        keep = mask.to(device=device, dtype=torch.bool)[..., None]  # [B, L, 1]; padding is on the right
        return torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=device))  # [B, L, D]
