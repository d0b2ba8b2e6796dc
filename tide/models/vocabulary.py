"""A vocabulary text encoder: prompts over a small word list, encoded offline by an embedding table.

The embedded ``fmnist-pixart`` model ships one as its text encoder (``text_encoder/`` in its pipeline
directory): ``vocab.json`` lists the words and ``model.safetensors`` holds ``embeddings`` (V, C), one
row per word plus the end-of-prompt token. A prompt is a bag of words, so ``"dark trouser"`` and
``"trouser dark"`` encode alike; it becomes ``[word embeddings..., <end>]`` padded to
``max_length`` with zero rows, and a mask that is 1 on its real tokens, as T5-style encoders give
PixArt. The empty prompt (the null caption used for classifier-free guidance) is ``[<end>]``.

``vocab.json``::

    {"format": "tide-vocabulary", "version": 1, "max_length": 6, "end_token": "<end>",
     "words": ["t-shirt/top", ..., "dark", "light", ...],   # row i of the table is words[i]; the end token is last
     "aliases": {"t-shirt": "t-shirt/top", ...},            # other spellings accepted in prompts
     "groups": {"class": [...], "brightness": ["dark", "light"], "size": ["small", "large"]},
     "attributes": {...}}                                   # how each attribute word was measured (tide.eval.attributes)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from tide.errors import TideError

VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "tide-vocabulary"
VERSION = 1


@dataclass
class Vocabulary:
    """Words, their embedding table and the rules that turn a prompt into caption tokens."""

    words: list[str]
    """Vocabulary entries (an entry may hold a space, e.g. ``ankle boot``); row i of the table embeds words[i]."""
    embeddings_VC: torch.Tensor
    """(len(words) + 1, caption_channels): one row per word, then the end-of-prompt token."""
    max_length: int = 6
    """Caption tokens per prompt, the end token included; longer prompts are refused."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Other spellings accepted in prompts, mapped to a word."""
    groups: dict[str, list[str]] = field(default_factory=dict)
    """Named word groups (``class``, ``brightness``, ``size``): at most one word of a group per prompt."""
    attributes: dict = field(default_factory=dict)
    """How each attribute group was measured on the training images (see :mod:`tide.eval.attributes`)."""
    end_token: str = "<end>"

    def __post_init__(self):
        if self.embeddings_VC.dim() != 2 or self.embeddings_VC.shape[0] != len(self.words) + 1:
            raise TideError(f"the vocabulary's embedding table is {tuple(self.embeddings_VC.shape)} but it lists "
                            f"{len(self.words)} words: it needs ({len(self.words) + 1}, channels), the last row "
                            "embedding the end token")
        self._index = {w: i for i, w in enumerate(self.words)}

    @property
    def caption_channels(self) -> int:
        return int(self.embeddings_VC.shape[1])

    # ----------------------------------------------------------------------------- text -> ids
    def tokenize(self, prompt: str) -> list[int]:
        """Word ids of a prompt (greedy longest match of vocabulary entries and aliases; case, commas and
        extra spaces ignored). Unknown words are refused with the vocabulary listed."""
        tokens = [t for t in re.split(r"[\s,]+", prompt.strip().lower()) if t]
        ids: list[int] = []
        i = 0
        while i < len(tokens):
            for n in (3, 2, 1):
                phrase = " ".join(tokens[i:i + n])
                word = self.aliases.get(phrase, phrase)
                if len(tokens) - i >= n and word in self._index:
                    ids.append(self._index[word])
                    i += n
                    break
            else:
                raise TideError(f"unknown word {tokens[i]!r} in prompt {prompt!r}: the vocabulary is "
                                f"{', '.join(self.words)}")
        for name, members in self.groups.items():
            used = [self.words[j] for j in ids if self.words[j] in members]
            if len(used) > 1:
                raise TideError(f"prompt {prompt!r} names {len(used)} {name} words ({', '.join(used)}): use at most one")
        if len(ids) + 1 > self.max_length:
            raise TideError(f"prompt {prompt!r} has {len(ids)} words; this vocabulary takes at most "
                            f"{self.max_length - 1}")
        return ids

    def token_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, max_length) token ids (words, then the end token; padding = end id, masked) and the mask."""
        end = len(self.words)
        ids_PL = torch.full((len(prompts), self.max_length), end, dtype=torch.long)
        mask_PL = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for p, text in enumerate(prompts):
            ids = self.tokenize(text) + [end]
            ids_PL[p, :len(ids)] = torch.tensor(ids)
            mask_PL[p, :len(ids)] = 1
        return ids_PL, mask_PL

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompt_embeds`` (P, max_length, C), zero on padding, and ``prompt_attention_mask`` (P, max_length)."""
        ids_PL, mask_PL = self.token_ids(prompts)
        embeds_PLC = self.embeddings_VC[ids_PL] * mask_PL[..., None].to(self.embeddings_VC.dtype)
        return embeds_PLC, mask_PL

    def prompt_bank(self, prompts: Sequence[str]):
        """A :class:`~tide.models.base.PromptBank` of these prompts, with the empty prompt as its null row."""
        from tide.models.base import PromptBank

        prompts = [str(p) for p in prompts]
        if not prompts:
            raise TideError("no prompts given: pass at least one prompt over the vocabulary")
        embeds, mask = self.encode(prompts)
        neg_embeds, neg_mask = self.encode([""])
        return PromptBank({"prompt_embeds": embeds.float(), "prompt_attention_mask": mask,
                           "negative_prompt_embeds": neg_embeds.float(),
                           "negative_prompt_attention_mask": neg_mask}, texts=prompts)

    # ----------------------------------------------------------------------------- files
    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / VOCAB_FILE).write_text(json.dumps({
            "format": FORMAT, "version": VERSION, "max_length": self.max_length, "end_token": self.end_token,
            "words": self.words, "aliases": self.aliases, "groups": self.groups,
            "attributes": self.attributes}, indent=2) + "\n")
        save_file({"embeddings": self.embeddings_VC.detach().float().contiguous().cpu()},
                  str(directory / WEIGHTS_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> "Vocabulary":
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            spec = json.loads((directory / VOCAB_FILE).read_text())
        except FileNotFoundError:
            raise TideError(f"{directory / VOCAB_FILE} is missing: the text encoder directory is incomplete") from None
        except (OSError, ValueError) as exc:
            raise TideError(f"{directory / VOCAB_FILE} is not valid JSON ({exc}): the text encoder is damaged") from None
        if not isinstance(spec, dict) or spec.get("format") != FORMAT or spec.get("version") != VERSION:
            raise TideError(f"{directory / VOCAB_FILE} is not a {FORMAT} version {VERSION} file")
        try:
            table = load_file(str(directory / WEIGHTS_FILE))["embeddings"]
        except Exception as exc:  # safetensors raises several types for bad files
            raise TideError(f"cannot read the vocabulary's embedding table {directory / WEIGHTS_FILE} ({exc})") from None
        try:
            words = spec["words"]
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise TypeError("words is not a list of strings")
            return cls(words=list(words), embeddings_VC=table, max_length=int(spec["max_length"]),
                       aliases=dict(spec.get("aliases", {})), groups=dict(spec.get("groups", {})),
                       attributes=dict(spec.get("attributes", {})), end_token=str(spec.get("end_token", "<end>")))
        except (KeyError, TypeError, ValueError) as exc:
            what = f"no {exc.args[0]!r} entry" if isinstance(exc, KeyError) else " ".join(str(exc).split())
            raise TideError(f"{directory / VOCAB_FILE} is damaged ({what}): restore the text encoder's vocab.json") from None

    @staticmethod
    def is_vocabulary(directory: str | Path) -> bool:
        """Whether a directory holds a vocabulary text encoder."""
        return (Path(directory) / VOCAB_FILE).is_file()
