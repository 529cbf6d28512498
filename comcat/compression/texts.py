"""Text data for a text encoder: a UTF-8 file with one sentence per line, tokenized by the model's
own tokenizer (saved beside its weights), padded to the longest sentence and cut at the model's
input length, split as a flat image folder is: a seeded half to evaluate on, a fifth of the other
half to validate on, the rest to train and fit on. There are no labels: the figures are fidelity
to the dense model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..core.errors import ComcatError
from . import families
from .families.hf_encoders import pad_id
from .images import NO_LABEL
from .splits import VAL_FRACTION, Splits, make_splits


def tokenizer_for(model: nn.Module):
    """The transformers tokenizer saved with the model (its folder or hub id, kept on loading)."""
    from transformers import AutoTokenizer

    where = (getattr(model, "pretrained_cfg", None) or {}).get("tokenizer")
    if not where:
        raise ComcatError("this text encoder was not loaded from a folder or hub id: load it with comcat.load_model")
    missing = ComcatError(
        f"{where} has no tokenizer comcat can load: save the model's tokenizer beside it "
        "(tokenizer.save_pretrained(folder))"
    )
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except Exception:
        raise missing from None
    if len(tok) <= len(tok.all_special_tokens):  # transformers makes an empty one for a folder without files
        raise missing
    return tok


def read_sentences(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped, each cut to MAX_LINE_CHARS characters (a
    text encoder reads a few hundred tokens of a sentence; the tokenizer never sees a huge line)."""
    from ..core.records import MAX_LINE_CHARS, MAX_TEXT_BYTES

    path = Path(path)
    if path.is_dir():  # a folder holding one text file (an unzipped upload) stands for it
        texts = sorted(p for p in path.iterdir() if p.suffix == ".txt" and not p.name.startswith("."))
        if len(texts) != 1:
            raise ComcatError(
                f"{path} is a folder, and a text encoder reads a text file with one sentence per line "
                "(or a folder holding exactly one)"
            )
        path = texts[0]
    size = path.stat().st_size if path.is_file() else 0
    if size > MAX_TEXT_BYTES:
        raise ComcatError(
            f"{path} is {size / 2**20:,.0f} MB, over the {MAX_TEXT_BYTES / 2**20:,.0f} MB limit of a sentence file: "
            "use fewer sentences"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ComcatError(f"{path} does not exist: pass a text file with one sentence per line") from None
    except UnicodeDecodeError:
        raise ComcatError(f"{path} is not UTF-8 text: pass a text file with one sentence per line") from None
    return [s.strip()[:MAX_LINE_CHARS] for s in lines if s.strip()]


def tokenize(model: nn.Module, sentences: list[str]) -> tuple[torch.Tensor, int]:
    """((n, N) token ids padded to the longest sentence, N at most the model's input length L; the
    number of sentences longer than L tokens, which are cut at L). Padding to the longest sentence
    rather than to L spares the passes over padding (masked out either way)."""
    tok = tokenizer_for(model)
    length = families.input_size(model)[0]
    ids = tok(sentences, padding="longest", truncation=True, max_length=length, return_tensors="pt")["input_ids"]
    pad = pad_id(model)
    if tok.pad_token_id is not None and tok.pad_token_id != pad:
        ids = ids.masked_fill(ids == tok.pad_token_id, pad)  # the id the model masks out
    cut = 0
    if ids.shape[1] == length:  # some sentence reached L: count those longer than it
        full = tok(sentences, truncation=False, verbose=False)["input_ids"]
        cut = sum(len(x) > length for x in full)
    return ids, cut


def sentence_splits(path: str | Path, model: nn.Module, seed: int = 0) -> Splits:
    """Disjoint train (= fit), validation and evaluation splits of the sentences in `path`."""
    sentences = read_sentences(path)
    if len(sentences) < 4:
        raise ComcatError(
            f"{path} has {len(sentences)} sentence(s): a compress run needs at least 4 (to train on, "
            "to validate on and to evaluate on)"
        )
    ids, cut = tokenize(model, sentences)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    held, rest = sorted(perm[0::2]), perm[1::2]
    n_val = max(1, round(VAL_FRACTION * len(rest)))
    val, train = sorted(rest[:n_val]), sorted(rest[n_val:])

    def part(index: list[int]) -> TensorDataset:
        return TensorDataset(ids[index], torch.full((len(index),), NO_LABEL))

    source = f"{path} ({len(sentences)} sentences; seeded halves, a fifth of the fitting half for validation)"
    note, unit = "sentences carry no labels", "sentences"
    if cut:
        note += f"; {cut} sentence(s) are longer than the model's {ids.shape[1]} tokens and are cut there"
    return Splits(part(train), part(train), part(val), part(held), source, False, note, unit)


SENTENCE_VIEWS = 6  # shuffled / spliced passes over the sentences in block distillation
VIEW_BYTES = 2 * 2**30  # at most this much for the distillation tokens of all the passes


def sentence_views(n: int, length: int, width: int) -> int:
    """How many SentenceViews passes block distillation takes for n sentences of `length` tokens in a
    model of `width`: SENTENCE_VIEWS, fewer when (1 + views) passes of tokens (kept three times, as
    float32: inputs, targets, the student's) would pass VIEW_BYTES."""
    per_pass = 3 * 4 * n * length * width
    return max(0, min(SENTENCE_VIEWS, VIEW_BYTES // max(1, per_pass) - 1))


class SentenceViews:
    """The (ids, y) batches of `loader`, then `views` seeded passes over them that make new sentences
    from the same tokens (the text analogue of image crops): even passes shuffle each sentence's
    inner tokens, odd passes join a prefix of one sentence with a suffix of another. The first and
    last real tokens ([CLS] / [SEP], <s> / </s>) stay in place; padding (`pad`) stays at the end.
    The same seed gives the same sentences (a resumed run sees the ones it started with)."""

    def __init__(self, loader, pad: int, views: int = SENTENCE_VIEWS, seed: int = 0):
        self.loader, self.pad, self.views, self.seed = loader, pad, views, seed

    def __iter__(self):
        yield from self.loader
        for v in range(self.views):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + v + 1)
            for ids, y in self.loader:
                yield self.remix(ids, g, splice=v % 2 == 1), y

    def remix(self, ids: torch.Tensor, g: torch.Generator, splice: bool) -> torch.Tensor:
        """(B, N) token ids -> (B, N) new sentences of the same tokens (class docstring)."""
        lengths = (ids != self.pad).sum(1).tolist()
        inner = [row[1 : n - 1] for row, n in zip(ids, lengths)]
        partner = torch.randperm(len(ids), generator=g).tolist()
        out = torch.full_like(ids, self.pad)
        for i, (row, n) in enumerate(zip(ids, lengths)):
            if n < 3:  # nothing between the first and last token
                out[i, :n] = row[:n]
                continue
            a = inner[i]
            if splice:
                b = inner[partner[i]]
                cut_a = int(torch.randint(1, len(a) + 1, (1,), generator=g))
                cut_b = int(torch.randint(0, len(b) + 1, (1,), generator=g))
                body = torch.cat([a[:cut_a], b[cut_b:]])[: ids.shape[1] - 2]
            else:
                body = a[torch.randperm(len(a), generator=g)]
            out[i, 0], out[i, 1 : 1 + len(body)], out[i, 1 + len(body)] = row[0], body, row[n - 1]
        return out


def is_text_encoder(model: nn.Module) -> bool:
    """Whether `model` reads token ids (B, N), not images."""
    return len(families.input_size(model)) == 1


def data_splits(data, model: nn.Module, seed: int = 0, **kwargs) -> Splits:
    """The splits a compress run makes of `data`: sentence_splits of a text encoder's file of
    sentences, else splits.make_splits(data, model, seed, **kwargs)."""
    if data not in (None, "", "embedded") and is_text_encoder(model):
        return sentence_splits(data, model, seed)
    return make_splits(data, model, seed, **kwargs)
