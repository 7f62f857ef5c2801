"""Our CLIP BPE tokenizer: known ids, framing of the (B, 77) batch, truncation, vocabulary lookup.

open_clip's own tokenizer imports ftfy (not installed), so it cannot serve as a reference here; the
ids below were read off the vocabulary file by hand (line N of the merges is id 511 + N) and agree
with the ids CLIP publishes for these words.
"""

from __future__ import annotations

import gzip

import pytest
import torch

from cclddg.encoders.clip_tokenizer import (
    VOCAB_ENV,
    CLIPTokenizer,
    byte_symbols,
    clean_text,
    find_vocab,
)
from cclddg.errors import UserError

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    try:
        find_vocab()
    except UserError as e:
        pytest.skip(str(e))
    return CLIPTokenizer()


def test_vocabulary_layout(tok: CLIPTokenizer) -> None:
    assert len(tok) == 49408
    assert (tok.sot_token, tok.eot_token) == (SOT, EOT)
    assert tok.decoder[0] == "!" and tok.decoder[256] == "!</w>"
    # the first merge line of the file ("i n") is the first merged token
    with gzip.open(find_vocab(), "rt", encoding="utf-8") as f:
        f.readline()
        first = f.readline().split()
    assert tok.decoder[512] == "".join(first) == "in"


def test_byte_symbols_cover_every_byte_once() -> None:
    table = byte_symbols()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == chr(256 + 32)  # space is the 33rd non-printable byte


@pytest.mark.parametrize("text, ids", [
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("dog", [1929]),
    ("Hello, World!", [3306, 267, 1002, 256]),
    ("it's", [585, 568]),
])
def test_known_ids(tok: CLIPTokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text) == ids


def test_merges_split_rare_words_and_decode_round_trips(tok: CLIPTokenizer) -> None:
    ids = tok.encode("unbelievably photorealistic watercolour")
    assert len(ids) > 3  # at least one word needs several tokens
    assert tok.decode(ids) == "unbelievably photorealistic watercolour"
    assert tok.decode(tok.encode("naïve café 日本")) == "naïve café 日本"  # multi-byte UTF-8 survives


def test_cleaning(tok: CLIPTokenizer) -> None:
    assert clean_text("  A&amp;B \n\t  “Curly”  ﬁsh ＡＢ ") == 'a&b "curly" fish ab'
    assert tok.encode("A  Photo\nOF a CAT") == tok.encode("a photo of a cat")


def test_batch_framing_and_padding(tok: CLIPTokenizer) -> None:
    batch = tok(["a photo of a cat", "dog"])
    assert batch.dtype == torch.long and batch.shape == (2, 77)
    assert batch[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    assert batch[1, :3].tolist() == [SOT, 1929, EOT]
    assert not batch[0, 7:].any() and not batch[1, 3:].any()
    assert tok.decode(batch[0]) == "a photo of a cat"  # stops at the end token, padding ignored
    assert torch.equal(tok("dog"), batch[1:])


def test_empty_string(tok: CLIPTokenizer) -> None:
    assert tok.encode("") == []
    assert tok("")[0, :3].tolist() == [SOT, EOT, 0]
    assert tok.count_tokens("") == 2


def test_truncation_keeps_the_end_token(tok: CLIPTokenizer) -> None:
    text = "cat " * 100
    assert tok.count_tokens(text) == 102
    row = tok(text)[0]
    assert row[0] == SOT and row[-1] == EOT
    assert (row[1:-1] == 2368).all()
    short = tok(text, context_length=5)[0]
    assert short.tolist() == [SOT, 2368, 2368, 2368, EOT]
    with pytest.raises(UserError, match="context_length"):
        tok("cat", context_length=1)


def test_count_tokens(tok: CLIPTokenizer) -> None:
    assert tok.count_tokens("a photo of a cat") == 7


def test_vocabulary_lookup(tmp_path, monkeypatch) -> None:
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(UserError, match="does not exist"):
        find_vocab(missing)
    monkeypatch.setenv(VOCAB_ENV, str(missing))
    with pytest.raises(UserError, match=VOCAB_ENV):
        find_vocab()
    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\n")
    monkeypatch.setenv(VOCAB_ENV, str(bad))
    assert find_vocab() == bad
    with pytest.raises(UserError, match="not the CLIP BPE vocabulary"):
        CLIPTokenizer()
