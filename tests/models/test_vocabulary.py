"""The vocabulary text encoder on its own: files, encoding, refusals."""

import json

import pytest
import torch

from tide.errors import TideError
from tide.models.vocabulary import Vocabulary


def _vocab(max_length=3):
    words = ["coat", "ankle boot", "dark", "light"]
    return Vocabulary(words=words, embeddings_VC=torch.randn(len(words) + 1, 3), max_length=max_length,
                      aliases={"boot": "ankle boot"}, groups={"class": ["coat", "ankle boot"],
                                                              "brightness": ["dark", "light"]})


def test_encoding_pads_with_zero_rows_and_masks_them():
    v = _vocab()
    embeds, mask = v.encode(["dark coat", ""])
    assert embeds.shape == (2, 3, 3) and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    torch.testing.assert_close(embeds[0, 0], v.embeddings_VC[2])
    torch.testing.assert_close(embeds[0, 2], v.embeddings_VC[-1])  # the end token
    assert embeds[1, 1:].abs().sum() == 0
    assert v.tokenize("ANKLE   boot") == v.tokenize("boot") == [1]


def test_prompts_longer_than_the_caption_are_refused():
    with pytest.raises(TideError, match="takes at most 1"):
        _vocab(max_length=2).encode(["dark coat"])
    with pytest.raises(TideError, match="no prompts"):
        _vocab().prompt_bank([])


def test_save_and_load_round_trip_and_damaged_files_are_named(tmp_path):
    v = _vocab()
    v.save(tmp_path / "te")
    w = Vocabulary.load(tmp_path / "te")
    assert w.words == v.words and w.aliases == v.aliases and w.max_length == 3
    torch.testing.assert_close(w.embeddings_VC, v.embeddings_VC)
    (tmp_path / "te" / "vocab.json").write_text("{not json")
    with pytest.raises(TideError, match="not valid JSON"):
        Vocabulary.load(tmp_path / "te")
    (tmp_path / "te" / "vocab.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(TideError, match="not a tide-vocabulary"):
        Vocabulary.load(tmp_path / "te")
    with pytest.raises(TideError, match="embedding table"):
        Vocabulary(words=["a"], embeddings_VC=torch.zeros(1, 2))
