"""The CLIP byte-pair-encoding tokenizer (the one CLOOB was trained with), written for this package.

Why our own: `open_clip.tokenizer` pulls in ftfy and torchvision, neither of which we need. Only its
vocabulary file, `bpe_simple_vocab_16e6.txt.gz`, is borrowed; it ships inside the open-clip-torch
wheel, which can be installed without its dependencies (`pip install --no-deps open-clip-torch`).

Token ids: 256 byte symbols, the same 256 with the end-of-word mark `</w>`, 48,894 merges, then
`<|startoftext|>` (49406) and `<|endoftext|>` (49407): 49,408 in all. Text is cleaned as CLIP does
(HTML entities, whitespace, lower case); ftfy's repairs are approximated by the few that matter
for typed prompts (NFC, curly quotes, ligatures, full-width ASCII, control characters), without
its mojibake detection.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import itertools
import os
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import regex
import torch

from cclddg.errors import UserError

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_ENV = "CCLDDG_BPE_VOCAB"
N_MERGES = 49152 - 256 - 2
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's pre-tokenizer: the special tokens, English contractions, letter runs, single digits,
# runs of other non-space symbols.
_SPLIT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""",
                       regex.IGNORECASE)
_SPACES = regex.compile(r"\s+")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                            "\ufb05": "st", "\ufb06": "st", "\u0132": "IJ", "\u0133": "ij"})
_FULLWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}  # full-width ASCII -> ASCII
_FULLWIDTH[0x3000] = 0x20  # ideographic space


def byte_symbols() -> dict[int, str]:
    """Each byte -> one printable character, so merges can be written as text.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved to
    code points 256+ in byte order. The dict's order is the order of the first 256 vocabulary ids.
    """
    table = {b: chr(b) for r in ((0x21, 0x7E), (0xA1, 0xAC), (0xAE, 0xFF)) for b in range(r[0], r[1] + 1)}
    spare = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(spare)
            spare += 1
    return table


def find_vocab(path: str | Path | None = None) -> Path:
    """The vocabulary file: `path`, else $CCLDDG_BPE_VOCAB, else the copy inside open-clip-torch."""
    if path is not None:
        where = Path(path)
        if not where.is_file():
            raise UserError(f"the CLIP BPE vocabulary {where} does not exist")
        return where
    env = os.environ.get(VOCAB_ENV)
    if env:
        where = Path(env)
        if not where.is_file():
            raise UserError(f"{VOCAB_ENV}={env} does not name an existing file")
        return where
    # find_spec locates the package without running its __init__ (which needs torchvision)
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / VOCAB_NAME
        if candidate.is_file():
            return candidate
    raise UserError("the CLIP BPE vocabulary ships with open-clip-torch: pip install --no-deps open-clip-torch "
                    f"(or set {VOCAB_ENV})")


def read_merges(path: Path) -> list[tuple[str, str]]:
    """The merge rules, best first: the lines after the header, as many as CLIP uses."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the CLIP BPE vocabulary {path}: {e}") from None
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise UserError(f"{path} is not the CLIP BPE vocabulary (expected {N_MERGES} merge lines of two symbols)")
    return merges  # type: ignore[return-value]


def clean_text(text: str) -> str:
    """CLIP's text cleaning: repaired unicode, HTML entities decoded, single spaces, lower case."""
    text = unicodedata.normalize("NFC", text)
    text = text.translate(_QUOTES).translate(_LIGATURES).translate(_FULLWIDTH)
    text = "".join(c for c in text if c.isspace() or unicodedata.category(c) != "Cc")
    text = html.unescape(html.unescape(text))
    return _SPACES.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """Text -> CLIP token ids. `tokenizer(texts)` gives the (B, 77) batch the text tower reads."""

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        merges = read_merges(find_vocab(vocab_path))
        self.byte_to_symbol = byte_symbols()
        self.symbol_to_byte = {s: b for b, s in self.byte_to_symbol.items()}
        singles = list(self.byte_to_symbol.values())
        vocab = singles + [s + END_OF_WORD for s in singles] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = vocab
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.sot_token = self.encoder[SOT]
        self.eot_token = self.encoder[EOT]
        # special tokens typed into a prompt stay whole, as in CLIP's own tokenizer
        self._cache: dict[str, tuple[str, ...]] = {SOT: (SOT,), EOT: (EOT,)}

    def __len__(self) -> int:
        return len(self.decoder)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the symbols of one word, best-ranked pair first, until no known pair is left."""
        done = self._cache.get(word)
        if done is not None:
            return done
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            ranks = [self.merge_rank.get(pair, N_MERGES) for pair in itertools.pairwise(parts)]
            best = min(ranks)
            if best == N_MERGES:
                break
            first, second = parts[ranks.index(best)], parts[ranks.index(best) + 1]
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) > 200_000:  # prompts are few; this only bounds pathological inputs
            self._cache = {SOT: (SOT,), EOT: (EOT,)}
        self._cache[word] = tuple(parts)
        return self._cache[word]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the start and end tokens."""
        ids: list[int] = []
        for piece in _SPLIT.findall(clean_text(text)):
            word = "".join(self.byte_to_symbol[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(word))
        return ids

    def count_tokens(self, text: str) -> int:
        """Length of `text` in tokens, start and end tokens included."""
        return len(self.encode(text)) + 2

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text: the start token is skipped and reading stops at the end token (padding follows it)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        data = bytearray()
        for i in ids:
            if i == self.eot_token:
                break
            if i == self.sot_token:
                continue
            token = self.decoder[i]
            word_end = token.endswith(END_OF_WORD)
            data.extend(self.symbol_to_byte[c] for c in (token[:-len(END_OF_WORD)] if word_end else token))
            if word_end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
        """(B, context_length) int64: start token, text tokens, end token, zero padding.

        A text that does not fit is cut, and the end token is kept as the last token (the text
        tower reads its mask from it).
        """
        if context_length < 2:
            raise UserError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token, *self.encode(text)[:context_length - 2], self.eot_token]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@lru_cache(maxsize=4)
def _cached_tokenizer(vocab: Path) -> CLIPTokenizer:
    return CLIPTokenizer(vocab)


def default_tokenizer(vocab_path: str | Path | None = None) -> CLIPTokenizer:
    """A shared tokenizer per vocabulary file (reading the merges takes ~0.3 s)."""
    return _cached_tokenizer(find_vocab(vocab_path).resolve())
