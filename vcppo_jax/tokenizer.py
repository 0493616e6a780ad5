"""One tokenizer interface over two backends: SentencePiece ``.model`` files and HF
``tokenizer.json`` files (the ``tokenizers`` package).

    tok = load_tokenizer("path/to/tokenizer.json", prompt_template="Q: {prompt}\\nA:")
    prompts, lengths = tok.encode_prompts(["1+1?", "2+2?"])  # right padded [B, P], [B]

``check_vocab(tok, model_config)`` refuses a model whose embedding table is smaller than the
tokenizer's vocabulary. ``train_sentencepiece`` builds a small model from a text corpus (the
miniature tasks train theirs at set-up).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used as asked: a bad file, template or special token,
    a prompt over ``max_length``, or a model vocabulary smaller than the tokenizer's."""

    pass


class Tokenizer:
    """Common surface. Subclasses implement ``_encode``, ``_decode`` and the special ids."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    def __init__(self, prompt_template: str = "{prompt}", add_bos: bool = True):
        if "{prompt}" not in prompt_template:
            raise TokenizerError(
                f"prompt_template must contain '{{prompt}}'; got {prompt_template!r}"
            )
        self.prompt_template = prompt_template
        self.add_bos = add_bos

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (no template), with BOS / EOS added when asked and defined."""
        ids = self._encode(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``, with BOS, EOS and pad ids dropped unless ``skip_special`` is False."""
        ids = [int(i) for i in ids]
        if skip_special:
            special = {self.bos_id, self.eos_id, self.pad_id}
            ids = [i for i in ids if i not in special]
        return self._decode(ids)

    def format_prompt(self, prompt: str) -> str:
        """``prompt`` placed into the prompt template."""
        return self.prompt_template.replace("{prompt}", prompt)

    def encode_prompts(
        self, prompts: Sequence[str], *, max_length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Templated, tokenised, right-padded prompts ``[B, P]`` (int32) and lengths ``[B]``.
        A prompt longer than ``max_length`` is an error, not a silent cut."""
        rows = [self.encode(self.format_prompt(p), add_bos=self.add_bos) for p in prompts]
        lengths = np.array([len(r) for r in rows], np.int32)
        if max_length is not None and len(rows) and lengths.max() > max_length:
            i = int(lengths.argmax())
            raise TokenizerError(
                f"prompt {i} has {lengths[i]} tokens, more than max_length={max_length}"
            )
        width = int(lengths.max()) if len(rows) else 0
        out = np.full((len(rows), max(width, 1)), self.pad_id, np.int32)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out, lengths

    def decode_batch(self, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
        """One text per row of ``tokens [B, T]``, from the tokens where ``mask [B, T]`` > 0."""
        pairs = zip(tokens, mask, strict=True)
        return [self.decode(np.asarray(t)[np.asarray(m) > 0]) for t, m in pairs]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file; without a pad id, pad is EOS (else 0)."""

    def __init__(self, path: str, **kw):
        import sentencepiece as spm

        super().__init__(**kw)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e
        self.vocab_size = self.sp.GetPieceSize()
        norm = lambda i: None if i < 0 else int(i)
        self.bos_id = norm(self.sp.bos_id())
        self.eos_id = norm(self.sp.eos_id())
        pad = norm(self.sp.pad_id())
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def _encode(self, text):
        return list(self.sp.EncodeAsIds(text))

    def _decode(self, ids):
        return self.sp.DecodeIds(list(ids))


class HFTokenizer(Tokenizer):
    """``tokenizer.json``; special tokens from ``tokenizer_config.json`` beside it when present,
    else from the arguments (names of tokens, e.g. ``eos_token="<|im_end|>"``)."""

    def __init__(self, path: str, *, bos_token=None, eos_token=None, pad_token=None, **kw):
        from tokenizers import Tokenizer as _HF

        super().__init__(**kw)
        try:
            self.tok = _HF.from_file(path)
        except Exception as e:  # The Rust side raises its own exception type.
            raise TokenizerError(f"{path}: not a tokenizer.json file ({e})") from e
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        cfg = {}
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)

        def token_id(name, given):
            token = given if given is not None else cfg.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            if token is None:
                return None
            tid = self.tok.token_to_id(token)
            if tid is None:
                raise TokenizerError(f"{path}: {name} {token!r} is not in the vocabulary")
            return tid

        self.bos_id = token_id("bos_token", bos_token)
        self.eos_id = token_id("eos_token", eos_token)
        pad = token_id("pad_token", pad_token)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def _encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: str, **kw) -> Tokenizer:
    """A ``.model`` file (SentencePiece), a ``tokenizer.json``, or a directory holding one."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model", "spm.model"):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), **kw)
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: no such tokenizer file")
    if path.endswith(".json"):
        return HFTokenizer(path, **kw)
    if path.endswith(".model"):
        hf_only = ("bos_token", "eos_token", "pad_token")
        return SentencePieceTokenizer(path, **{k: v for k, v in kw.items() if k not in hf_only})
    raise TokenizerError(f"{path}: expected a .model (SentencePiece) or tokenizer.json file")


def check_vocab(tokenizer: Tokenizer, model_config) -> None:
    """The model must have an embedding row for every token id the tokenizer can produce."""
    if model_config.vocab_size < tokenizer.vocab_size:
        raise TokenizerError(
            f"model vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size} tokens): token ids would index past the "
            "embedding table"
        )


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = (),
) -> str:
    """Trains a SentencePiece model on ``texts``; returns the ``.model`` path.

    Ids: pad 0, bos 1, eos 2, unk 3. Digits are split one per token, so arithmetic is
    tokenised the same way in every context.
    """
    import sentencepiece as spm

    corpus = io.StringIO("\n".join(texts))
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(corpus.getvalue().splitlines()),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        split_digits=True,
        user_defined_symbols=list(user_defined_symbols),
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model_prefix + ".model"
