"""Python API: next-item recommendations from a fine-tuned model of a run directory.

    from igdrec import Recommender

    rec = Recommender.load("runs/ml100k", sft="demo-igd")
    for item_id, title, score in rec.recommend(["Toy Story (1995)", "Fargo (1996)"], k=10):
        print(item_id, title, score)

A history is a list of catalog titles or item ids, oldest first. Recommendations go through the same
`decoding.Decoder` as the `decode` stage: with `exclude_history=False` and the decode's α, length
penalty and beams, a test sample's history gets exactly that sample's decode list.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from igdrec.config import DecodeConfig
from igdrec.decoding import Decoder
from igdrec.errors import IgdrecError
from igdrec.rundir import RunDir


class Recommendation(NamedTuple):
    item_id: int
    title: str
    score: float  # the beam score S / L^lp (docs/method.md §6); higher is better


@dataclass
class PreparedHistory:
    """A history resolved against the catalog, with its prompt."""

    item_ids: list[int]  # every given item, oldest first
    prompt_ids: list[int]
    kept: int  # how many of the most recent items the prompt holds (fewer than given: the rest did not fit)

    @property
    def dropped(self) -> int:
        return len(self.item_ids) - self.kept


class Recommender:
    """Recommendations from one model of a run (see the module docstring)."""

    def __init__(self, decoder: Decoder, items_path: Path | None = None):
        self.decoder = decoder
        self.catalog = decoder.catalog
        self.items_path = items_path or Path("items.parquet")
        # Exact titles first; the smallest id of a duplicated title stands for it, as in the beams.
        self._id_of_title: dict[str, int] = {}
        for item_id in sorted(self.catalog.titles):
            self._id_of_title.setdefault(self.catalog.titles[item_id], item_id)
        self._ids_of_folded: dict[str, set[int]] = {}
        for title, item_id in self._id_of_title.items():
            self._ids_of_folded.setdefault(_fold(title), set()).add(item_id)

    @classmethod
    def load(cls, run_dir: str | Path | RunDir, sft: str | None = None, model: str | None = None, *,
             config: DecodeConfig | None = None, **options) -> "Recommender":
        """The model `sft=NAME` (a fine-tune of the run; the only one when neither is given) or
        `model=SPEC`, with decode options (alpha, length_penalty, device, batch_size, cutoff_len...)
        taken from `config` and overridden by keyword."""
        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        config = config or DecodeConfig()
        if sft is not None or model is not None:  # a model named here replaces the config's
            options |= {"sft": sft, "model": model}
            config = dataclasses.replace(config, sft=None, model=None)
        decoder = Decoder.from_run(run, config, constrained=True, **options)
        return cls(decoder, run.artifact("data", "items.parquet"))

    # --- histories

    def item_id(self, title: str) -> int:
        """The item id of a catalog title (exact, else ignoring case and spacing when that is unique);
        an unknown title is an error that names the closest catalog titles."""
        if title in self._id_of_title:
            return self._id_of_title[title]
        folded = self._ids_of_folded.get(_fold(title), set())
        if len(folded) == 1:
            return next(iter(folded))
        close = difflib.get_close_matches(title, list(self._id_of_title), n=3, cutoff=0.6)
        if not close:  # misspelt case, say, which the plain ratio punishes
            by_folded = {_fold(t): t for t in self._id_of_title}
            close = [by_folded[f] for f in difflib.get_close_matches(_fold(title), list(by_folded), n=3, cutoff=0.6)]
        hint = f"; closest: {', '.join(repr(t) for t in close)}" if close else "; no catalog title is close"
        raise IgdrecError(f"history title {title!r} is not in {self.items_path}{hint}")

    def resolve(self, history: Sequence[str | int]) -> list[int]:
        """Item ids of a history given as titles and/or item ids."""
        if isinstance(history, (str, int)):
            raise TypeError("a history is a list of titles or item ids, oldest first")
        ids = []
        for position, entry in enumerate(history):
            if isinstance(entry, str):
                ids.append(self.item_id(entry))
            elif isinstance(entry, numbers.Integral) and not isinstance(entry, bool):  # numpy integers too
                item_id = int(entry)
                if item_id not in self.catalog.titles:
                    raise IgdrecError(f"history item id {item_id} is not in {self.items_path}")
                ids.append(item_id)
            else:  # 1.7 or True would silently mean item 1
                raise IgdrecError(f"history[{position}] = {entry!r} ({type(entry).__name__}): expected an integer item id or a catalog title")
        if not ids:
            raise IgdrecError("the history is empty: give at least one item the user interacted with")
        return ids

    def prepare(self, history: Sequence[str | int] | PreparedHistory) -> PreparedHistory:
        if isinstance(history, PreparedHistory):
            return history
        ids = self.resolve(history)
        prompt_ids, kept = self.decoder.prompt(ids)
        return PreparedHistory(item_ids=ids, prompt_ids=prompt_ids, kept=kept)

    # --- recommendations

    def recommend(self, history: Sequence[str | int] | PreparedHistory, k: int = 10, exclude_history: bool = True) -> list[Recommendation]:
        """The top-k next items for one history (titles or item ids, oldest first), best first."""
        return self.recommend_batch([history], k=k, exclude_history=exclude_history)[0]

    def recommend_batch(self, histories: Sequence[Sequence[str | int] | PreparedHistory], k: int = 10,
                        exclude_history: bool = True) -> list[list[Recommendation]]:
        """`recommend` for many histories, batched (the same lists as one call per history)."""
        if k < 1:
            raise IgdrecError(f"--top-k {k}: must be at least 1")
        prepared = [self.prepare(h) for h in histories]
        # k beams, as `decode --num-beams k`; seen items (and titles they share) are masked in the search
        # itself, so each of the k beams stays available for an unseen item whatever the history's length.
        exclude = [p.item_ids for p in prepared] if exclude_history else None
        hypotheses = self.decoder.search([p.prompt_ids for p in prepared], num_beams=k, exclude=exclude)
        return [[Recommendation(d.item_id, d.title, d.score) for d in self.decoder.items(hyps)] for hyps in hypotheses]


def _fold(title: str) -> str:
    return " ".join(title.split()).casefold()
