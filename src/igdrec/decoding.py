"""Decoding library: a run's model and catalog, prompts from histories, beam search, hypotheses → items.

The `decode` stage, `igdrec recommend` and the Python API (`igdrec.api.Recommender`) all go through a
`Decoder`, so a recommendation for a test sample's history is exactly that sample's decode output
(docs/method.md §6 for the search itself, §3 for the prompt).

    decoder = Decoder.from_run("runs/x", sft="demo-igd", alpha=0.2)
    prompt_ids, kept = decoder.prompt([12, 7, 301])          # history item ids, oldest first
    hypotheses = decoder.search([prompt_ids])               # batched BeamSearch
    items = decoder.items(hypotheses[0])                     # DecodedItem per hypothesis, best first
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl

from igdrec import config as cfg
from igdrec import options, prompt, schema
from igdrec.config import DecodeConfig
from igdrec.errors import IgdrecError
from igdrec.ig import CatalogTrie
from igdrec.rundir import RunDir

COMPILE_BACKEND = "inductor"  # torch.compile's backend for --compile
CPU_BATCH_SIZE = 8  # measured fastest on 2 CPU cores (bench/bench_decode.py)
MAX_AUTO_BATCH_SIZE = 256  # beyond this a GPU gains little per sample (measured up to 256 on an H200)
AUTO_MEMORY_SHARE = 0.8  # of the free GPU memory: the allocator's fragmentation and CUDA workspaces need the rest


# --------------------------------------------------------------------------- which model


@dataclass(frozen=True)
class ModelSource:
    """The model a decode uses: a fine-tune of this run (`--sft NAME`) or any model (`--model SPEC`)."""

    label: str  # short name used in default decode names
    spec: str  # what `load_model` / `load_tokenizer` take
    sft: str | None  # the fine-tune's name, when it is one of this run's
    inputs: dict  # fingerprints of upstream stages the result depends on
    key: dict  # parameters that identify the model in a cache key: never a path into the run directory


def resolve_source(run: RunDir, sft: str | None, model: str | None) -> ModelSource:
    """--sft NAME or --model SPEC (the only fine-tune of the run when neither is given).

    A fine-tune is identified by its output fingerprint (in `inputs`) and its name, not by where the run
    directory lies, so `--run-dir runs/x` and `--run-dir /abs/runs/x` (or a moved run) share a cache key.
    """
    if sft and model:
        raise IgdrecError("pass either --sft NAME or --model SPEC, not both")
    if sft is None and model is None:
        sft = run.resolve_name("sft", None, "--sft (or --model)")
    if sft is not None:
        manifest = run.require(f"sft/{sft}", hint=f"igdrec sft --name {sft}")
        spec = str(run.stage_dir(f"sft/{sft}") / "model")
        return ModelSource(label=sft, spec=spec, sft=sft, inputs={"sft": manifest["fingerprint"]}, key={"sft": sft})
    label = options.artifact_label(Path(model.rstrip("/")).name)
    local = Path(model).expanduser()
    # A local directory is keyed by its absolute path so that two spellings of it are one decode.
    key_model = str(local.resolve()) if local.exists() else model
    return ModelSource(label=label, spec=model, sft=None, inputs={}, key={"model": key_model})


# --------------------------------------------------------------------------- the catalog


@dataclass
class Catalog:
    """A run's items, its catalog trie and the prompt's category word."""

    items: pl.DataFrame
    trie: CatalogTrie
    category: str
    history_len: int | None  # most recent items preprocess kept per history (None: not limited)
    titles: dict[int, str] = field(init=False)
    leaf_group: dict[int, int] = field(init=False)  # trie leaf node -> title group (smallest item id)
    group_of: dict[int, int] = field(init=False)  # item id in the trie -> its title group
    stripped_title_group: dict[str, int] = field(init=False)  # generated text -> title group

    def __post_init__(self) -> None:
        self.titles = dict(zip(self.items["item_id"].to_list(), self.items["title"].to_list()))
        self.leaf_group = dict(zip(self.trie.item_leaf.tolist(), self.trie.item_title_group.tolist()))
        self.group_of = dict(zip(self.trie.item_ids.tolist(), self.trie.item_title_group.tolist()))
        self.stripped_title_group = {}
        for item_id in sorted(self.titles):
            self.stripped_title_group.setdefault(self.titles[item_id].strip(), item_id)

    @classmethod
    def load(cls, run: RunDir) -> "Catalog":
        data = run.require("data", hint="igdrec preprocess")
        run.require("ig", hint="igdrec build-ig-index")
        items = schema.read(run.artifact("data", "items.parquet"), "items")
        trie = CatalogTrie.load(run.artifact("ig", "trie_nodes.parquet"), run.artifact("ig", "item_paths.parquet"))
        category = data.get("stats", {}).get("category_word") or prompt.DEFAULT_CATEGORY_WORD
        return cls(items=items, trie=trie, category=category, history_len=data.get("params", {}).get("history_len"))


def check_same_tokens(tokenizer, catalog: Catalog, where: Path) -> None:
    """Refuse a model whose tokenizer writes the catalog with other tokens than the IG index has."""
    trie = catalog.trie
    ids = trie.item_ids.tolist()
    sequences = prompt.item_token_sequences(tokenizer, [catalog.titles.get(i, "") for i in ids])
    for row, (item_id, expected) in enumerate(zip(ids, sequences)):
        stored = trie.token[trie.item_path_nodes[trie.item_path_ptr[row]:trie.item_path_ptr[row + 1]]].tolist()
        if stored != expected:
            raise IgdrecError(
                f"{where}: item {item_id}: the IG index was built with another tokenizer than the decoding "
                f"model's (tokens {stored[:6]}… vs {expected[:6]}…); rebuild it with igdrec build-ig-index --model <that model>"
            )


# --------------------------------------------------------------------------- hypotheses -> items


@dataclass
class DecodedItem:
    """One finished hypothesis as a catalog item (item_id None: free text that is no catalog title)."""

    item_id: int | None
    title: str | None
    score: float
    tokens: list[int]
    step_logprobs: list[float]
    prefix_entropy: list[float]


def hypothesis_items(hypotheses, catalog: Catalog, tokenizer, eos_token_id: int) -> list[DecodedItem]:
    """Map a prompt's hypotheses (best first) to catalog items: the title group of the trie leaf a
    constrained hypothesis ended on, or, unconstrained, the catalog title its text spells if any."""
    out = []
    for hyp in hypotheses:
        if hyp.nodes and hyp.nodes[-1] >= 0:
            item_id = catalog.leaf_group.get(hyp.nodes[-1])
            title = catalog.titles.get(item_id)
            prefix_entropy = catalog.trie.entropy[np.asarray(hyp.nodes)].tolist()
        else:
            title = tokenizer.decode([t for t in hyp.tokens if t != eos_token_id], skip_special_tokens=True).strip()
            item_id = catalog.stripped_title_group.get(title)
            prefix_entropy = [float("nan")] * len(hyp.tokens)
        out.append(DecodedItem(item_id, title, hyp.score, hyp.tokens, hyp.step_logprobs, prefix_entropy))
    return out


def beams_frame(sample_ids: Sequence[int], decoded: Sequence[Sequence[DecodedItem]]) -> pl.DataFrame:
    """The `beams` artifact rows: one per decoded item, ranked in hypothesis order."""
    rows = {c: [] for c in schema.BEAMS}
    for sample_id, items in zip(sample_ids, decoded):
        for rank, item in enumerate(items):
            rows["sample_id"].append(sample_id)
            rows["rank"].append(rank)
            rows["item_id"].append(item.item_id)
            rows["title"].append(item.title)
            rows["score"].append(item.score)
            rows["tokens"].append(item.tokens)
            rows["step_logprobs"].append(item.step_logprobs)
            rows["prefix_entropy"].append(item.prefix_entropy)
    return schema.conform(pl.DataFrame(rows, schema=schema.BEAMS), "beams")


# --------------------------------------------------------------------------- the text-free assistant (D3)


class TextFreeAssistant:
    """A baseline's next-item probabilities, computed for each decode batch from its saved model
    (D3, docs/method.md §6.4): memory O(batch × catalog items) and nothing per sample on disk.

    `probs(histories, sample_ids)` gives what `BeamSearch.search(assistant_probs=...)` takes: one row per
    history, the model's softmax over all item ids taken at the trie's item rows (`trie.item_ids`). A
    history is cut to the model's `max_len` most recent items, as the baseline stage cut it in training."""

    def __init__(self, model, max_len: int, item_ids: np.ndarray, device, source: str):
        import torch

        self.model = model  # in eval mode, on `device`
        self.max_len = max_len
        self.device = device
        self.source = source  # names the baseline in error messages
        self.columns = torch.tensor(np.asarray(item_ids, dtype=np.int64), device=device)

    @classmethod
    def load(cls, run: RunDir, baseline: str, trie: CatalogTrie, device) -> "TextFreeAssistant":
        """The model saved by `igdrec baseline --name BASELINE` in this run, on `device`."""
        from igdrec import seqrec

        directory = run.stage_dir(f"baseline/{baseline}")
        if not (directory / seqrec.checkpoint.SETTINGS).exists():
            raise IgdrecError(f"{directory}: no saved model for the text-free assistant (a baseline from an earlier igdrec); "
                              f"rerun the `igdrec baseline` that made it (--name {baseline})")
        model, max_len = seqrec.load_recommender(directory, device)
        needed = int(trie.item_ids.max()) + 1 if len(trie.item_ids) else 0
        if model.n_items < needed:
            raise IgdrecError(f"{directory / seqrec.checkpoint.SETTINGS}: the baseline scores {model.n_items} items, "
                              f"the catalog needs one per item id up to {needed - 1}")
        return cls(model, max_len, trie.item_ids, device, str(directory))

    def probs(self, histories: Sequence[Sequence[int]], sample_ids: Sequence[int]):
        """(len(histories), trie items) float32 tensor on the model's device; `sample_ids` name a bad history."""
        import torch

        from igdrec import seqrec

        item_seq, lengths = seqrec.pad_histories(histories, sample_ids, self.model.n_items, self.max_len, self.source)
        batch = seqrec.SequenceBatch(item_seq, lengths, lengths).to(self.device)  # the target is not read
        with torch.no_grad():
            scores = self.model.full_sort_predict(batch).float()
            return self.model.item_probabilities(scores)[:, self.columns]


# --------------------------------------------------------------------------- batch size


def sample_memory_bytes(model_config, num_beams: int, prompt_len: int, new_tokens: int, dtype_bytes: int,
                        candidate_width: int = 0) -> int:
    """Peak GPU memory one sample of a decode batch needs, from the model's shape.

    Terms: the KV cache (the prompt's cache is copied to each beam, and grows by up to `new_tokens`);
    the prefill's per-layer activations, and the widest step's logits: a jump-forward pass returns
    logits for every beam and every fed token (at most `new_tokens`), which the search turns into fp32
    log-probabilities (two fp32 copies); with static shapes, the step's candidates besides, `candidate_width`
    per beam (the trie's widest node), about 48 bytes each in the tensors the search gathers and ranks them
    in. The estimate takes the worst case of each term.
    """
    layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    hidden = model_config.hidden_size
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * hidden
    vocab = model_config.vocab_size
    kv_cache = 2 * layers * kv_heads * head_dim * dtype_bytes * (num_beams + 1) * (prompt_len + new_tokens)
    prefill = prompt_len * (6 * hidden + 3 * intermediate) * dtype_bytes
    step_logits = num_beams * (new_tokens + 1) * vocab * (dtype_bytes + 8)
    candidates = num_beams * candidate_width * 48
    return kv_cache + max(prefill, step_logits + candidates)


def auto_batch_size(model_config, num_beams: int, prompt_len: int, new_tokens: int, dtype_bytes: int, free_bytes: int,
                    candidate_width: int = 0) -> int:
    """The most samples per batch whose estimated peak memory fits into a share of `free_bytes`
    (at least 1, at most MAX_AUTO_BATCH_SIZE, a multiple of 8 from 8 on)."""
    per_sample = sample_memory_bytes(model_config, num_beams, prompt_len, new_tokens, dtype_bytes, candidate_width)
    fits = int(free_bytes * AUTO_MEMORY_SHARE // per_sample)
    batch = min(max(fits, 1), MAX_AUTO_BATCH_SIZE)
    return batch - batch % 8 if batch >= 8 else batch


# --------------------------------------------------------------------------- the decoder


class Decoder:
    """A loaded model + catalog + beam search with a decode configuration's settings."""

    def __init__(self, model, tokenizer, catalog: Catalog, config: DecodeConfig, source: ModelSource | None = None):
        from igdrec.beam import BeamSearch, TrieTensors

        self.model = model
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.config = config
        self.source = source
        self.device = next(model.parameters()).device
        self.fixed_batch_size = cfg.parse_batch_size(config.batch_size)
        self.last_batch_size: int | None = None
        longest = config.max_new_tokens or catalog.trie.max_depth
        if float(longest + 1) ** config.length_penalty > float(np.finfo(np.float32).max):  # S / L^lp would be -0 for all
            raise IgdrecError(f"--length-penalty {config.length_penalty:g}: L^lp overflows float32 for hypotheses of up to "
                              f"{longest + 1} tokens; choose a smaller length penalty (docs/method.md §6.2)")
        self.engine = BeamSearch.from_config(
            model, tokenizer.eos_token_id, tokenizer.pad_token_id, config,
            trie=TrieTensors.from_trie(catalog.trie, self.device) if config.constrained else None,
            max_new_tokens=longest,
            share_prefix=True,
            # a step that reads nothing back keeps a GPU's queue full; on a CPU, shrinking passes is faster
            static_shapes=self.device.type == "cuda" or config.compile,
            compile_backend=COMPILE_BACKEND if config.compile else None,
            autocast_dtype=None,  # the weights are already in the compute dtype (modeling.inference_dtype)
            self_check=True,  # once per decoder: a KV cache the model ignores fails loudly (docs/method.md §6.1)
        )

    @classmethod
    def from_run(cls, run_dir: RunDir | str | Path, config: DecodeConfig | None = None, **overrides) -> "Decoder":
        """Load the model (`sft=NAME` or `model=SPEC`) and catalog of a run; `overrides` replace `config`'s
        fields (None leaves a field as it is).

        A config handed in as it is counts as checked (the runner checked the decode stage's); one assembled
        here from `overrides` (the Python API's) is checked before anything loads.
        """
        from igdrec.modeling import inference_dtype, load_model, load_tokenizer, pick_device

        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(DecodeConfig)})
        if unknown:
            raise TypeError(f"unknown decode option(s): {', '.join(unknown)}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        if config is None or changes:
            config = dataclasses.replace(config or DecodeConfig(), **changes)
            options.check(config)  # free where the values are a checked config's (the CLI's `recommend`)
        catalog = Catalog.load(run)
        source = resolve_source(run, config.sft, config.model)
        tokenizer = load_tokenizer(source.spec)
        check_same_tokens(tokenizer, catalog, run.artifact("ig", "item_paths.parquet"))
        device = pick_device(config.device)
        model = load_model(source.spec, device=device, dtype=inference_dtype(device), merge_adapter=True)
        return cls(model, tokenizer, catalog, config, source)

    # --- prompts

    def prompt(self, history_item_ids: Sequence[int]) -> tuple[list[int], int]:
        """Prompt ids of a history (item ids, oldest first) and how many of its most recent items it holds.

        As in training: at most the `history_len` most recent items preprocess kept, then the oldest
        titles dropped until the prompt fits into `cutoff_len` tokens (prompt.encode_prompt).
        """
        history = list(history_item_ids)
        if self.catalog.history_len is not None:
            history = history[-self.catalog.history_len:]
        titles = [self.catalog.titles.get(i, "") for i in history]
        return prompt.encode_prompt(self.tokenizer, titles, self.catalog.category, self.config.cutoff_len)

    # --- search

    def batch_size(self, prompt_len: int, num_beams: int | None = None) -> int:
        """--batch-size, or with auto: CPU_BATCH_SIZE on CPU, and on CUDA the most samples that fit
        into the free memory (auto_batch_size)."""
        if self.fixed_batch_size is not None:
            return self.fixed_batch_size
        if self.device.type != "cuda":
            return CPU_BATCH_SIZE
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        dtype_bytes = next(self.model.parameters()).element_size()
        engine = self.engine
        width = engine.trie.max_children if engine.static_shapes and engine.trie is not None else 0
        return auto_batch_size(self.model.config, num_beams or engine.num_beams, prompt_len,
                               engine.max_new_tokens, dtype_bytes, free, width)

    def search(self, prompts: Sequence[Sequence[int]], num_beams: int | None = None,
               assistant: Callable[[list[int]], object] | None = None,
               advance: Callable[[int], None] | None = None, exclude: Sequence[Sequence[int]] | None = None) -> list[list]:
        """Beam search of every prompt (hypotheses best first), in batches of prompts of similar length.

        `assistant(indices)`: a text-free assistant's probabilities of the prompts at these indices, one row
        each, columns aligned with `catalog.trie.item_ids` (D3, docs/method.md §6), asked once per batch.
        `exclude`: per prompt, item ids the search must not return (masked in the trie, docs/method.md §6.1).
        Results do not depend on the batching.
        """
        engine = self.engine if num_beams in (None, self.engine.num_beams) else dataclasses.replace(self.engine, num_beams=num_beams)
        excluded = None
        if exclude is not None:
            excluded = np.empty(len(exclude), dtype=object)  # ragged: the trie item rows of each prompt's items
            for i, ids in enumerate(exclude):
                rows = self.catalog.trie.item_index(np.asarray(ids, dtype=np.int64))
                excluded[i] = rows[rows >= 0]
        if not prompts:
            return []
        batch_size = self.batch_size(max(len(p) for p in prompts), engine.num_beams)
        self.last_batch_size = batch_size
        # Similar lengths in one batch waste less compute on padding.
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        hypotheses: list = [None] * len(prompts)
        for begin in range(0, len(order), batch_size):
            chunk = order[begin:begin + batch_size]
            batch_extra = {} if assistant is None else {"assistant_probs": assistant(chunk)}
            if excluded is not None:
                batch_extra["exclude"] = excluded[chunk]
            for i, hyps in zip(chunk, engine.search([list(prompts[i]) for i in chunk], **batch_extra)):
                hypotheses[i] = hyps
            if advance is not None:
                advance(len(chunk))
        return hypotheses

    def items(self, hypotheses) -> list[DecodedItem]:
        return hypothesis_items(hypotheses, self.catalog, self.tokenizer, self.engine.eos_token_id)

    def decode_samples(self, samples: pl.DataFrame, assistant: TextFreeAssistant | None = None,
                       advance: Callable[[int], None] | None = None) -> pl.DataFrame:
        """`beams` rows for samples (sample_id, history_item_ids): what the decode stage writes, guided
        by `assistant` from each sample's whole history when one is given (--tfa)."""
        histories, sample_ids = samples["history_item_ids"].to_list(), samples["sample_id"].to_list()
        prompts = [self.prompt(history)[0] for history in histories]
        batch_probs = None if assistant is None else (
            lambda rows: assistant.probs([histories[i] for i in rows], [sample_ids[i] for i in rows]))
        hypotheses = self.search(prompts, assistant=batch_probs, advance=advance)
        return beams_frame(samples["sample_id"].to_list(), [self.items(h) for h in hypotheses])

    @property
    def stats(self):
        return self.engine.stats

