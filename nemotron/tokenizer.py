"""SentencePiece tokenizer with the behaviour of NeMo's SentencePieceTokenizer (non-legacy mode).

Nemotron-4 checkpoints set `sentencepiece_legacy: false`: text is encoded as plain SentencePiece ids, decoding
renders control pieces (<s>, </s>, <pad>) as empty text, and `<extra_id_N>` / `<|endoftext|>` are ordinary
(user-defined) pieces. NeMo maps the end string `<|endoftext|>` to the EOS id in generation, not here.
"""
from __future__ import annotations

import os
from typing import Iterable, List, Sequence

import sentencepiece


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise TokenizerError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError with little detail
            raise TokenizerError(f"cannot read SentencePiece model {model_path}: {exc}") from exc
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
        if self.eos_id < 0:
            raise TokenizerError(f"{model_path} defines no EOS piece; generation needs one")

    def text_to_ids(self, text: str) -> List[int]:
        return self.sp.encode_as_ids(text)

    def ids_to_text(self, ids: Iterable[int]) -> str:
        return self.sp.decode_ids([int(i) for i in ids])

    def ids_to_tokens(self, ids: Iterable[int]) -> List[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def token_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def single_piece_id(self, text: str) -> int | None:
        """The id of `text` if it encodes as exactly one piece in context, as NeMo tests end strings.

        NeMo prefixes `<extra_id_1>` so that SentencePiece's dummy-prefix '▁' does not change the piece.
        """
        prefix = self.text_to_ids("<extra_id_1>")
        ids = self.text_to_ids("<extra_id_1>" + text)
        if len(ids) == len(prefix) + 1 and ids[: len(prefix)] == prefix:
            return ids[-1]
        return None

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def offsets_of(tokens: Sequence[str]) -> List[int]:
    """NeMo's `offsets`: 0, then the running sum of each piece's character length, one entry per token."""
    offsets = [0]
    for piece in tokens[:-1]:
        offsets.append(offsets[-1] + len(piece))
    return offsets[: len(tokens)] if tokens else []
