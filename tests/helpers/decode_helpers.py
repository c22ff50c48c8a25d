"""Shared pieces of the decode/rerank/metrics tests: a peaked tiny model, the fixture catalog's trie,
an `ig` stage published by hand, and the brute-force scorer every beam result is checked against."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from fixtures import synthetic_run

from igdrec import prompt, schema
from igdrec.ig import CatalogTrie, build_catalog_trie
from igdrec.modeling import load_tokenizer
from igdrec.rundir import RunDir, StageWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def save_peaked_model(directory: Path, seed: int = 0, scale: float = 60.0) -> Path:
    """The tiny random Llama with scaled-up embeddings: a random model at init is nearly uniform, so
    beams would be separated by float noise; peaked distributions make every ranking well defined."""
    from tiny_model import save_tiny_model

    return save_tiny_model(directory, seed=seed, embedding_scale=scale)


def fixture_trie(tokenizer, items: pl.DataFrame, train: pl.DataFrame | None = None) -> CatalogTrie:
    counts = np.ones(items.height)
    if train is not None:
        freq = train["item_id"].value_counts()
        counts = np.zeros(items.height)
        counts[freq["item_id"].to_numpy()] = freq["count"].to_numpy()
    sequences = prompt.item_token_sequences(tokenizer, items["title"].to_list())
    return build_catalog_trie(items["item_id"].to_numpy(), sequences, counts)


def publish_ig(run: RunDir, tokenizer, model_spec: str) -> CatalogTrie:
    """Publish `<run>/ig` as build-ig-index would (trie from training-target frequencies)."""
    data = run.require("data", hint="fixture")
    items = schema.read(run.artifact("data", "items.parquet"), "items")
    train = schema.read(run.artifact("data", "train.parquet"), "samples")
    trie = fixture_trie(tokenizer, items, train)
    with StageWriter(run, "ig", stage="build-ig-index", params={"model": str(model_spec)},
                     inputs={"data": data["fingerprint"]}, force=True) as out:
        trie.save(out.path("trie_nodes.parquet"), out.path("item_paths.parquet"))
    return trie


def brute_force_node_mass(trie: CatalogTrie, item_probs: np.ndarray) -> np.ndarray:
    """Q(v) = Σ q(i) over the items whose path passes through v (the root holds every item)."""
    mass = np.zeros(trie.num_nodes)
    mass[0] = float(np.sum(item_probs))
    for row, q in enumerate(item_probs):
        for node in trie.item_path_nodes[trie.item_path_ptr[row]:trie.item_path_ptr[row + 1]]:
            mass[node] += q
    return mass


@torch.no_grad()
def exhaustive_ranking(model, prompt_ids: list[int], trie: CatalogTrie, alpha: float, length_penalty: float,
                       assistant_probs: np.ndarray | None = None, guidance: float = 1.0):
    """Teacher-force every distinct catalog sequence: (Σ step_d) / L^lp, best first, as (title_group, score).

    step_d = w_d log p, or with assistant probabilities q D3's g·(w_d log p − tfa_d) + tfa_d, where
    tfa_d = log(Q(node_d) / Σ Q over the children of its parent + 1e-20).
    """
    mass = brute_force_node_mass(trie, assistant_probs) if assistant_probs is not None else None
    scored = {}
    for row in range(len(trie.item_ids)):
        group = int(trie.item_title_group[row])
        if group in scored:
            continue
        nodes = trie.item_path_nodes[trie.item_path_ptr[row]:trie.item_path_ptr[row + 1]]
        tokens = trie.token[nodes].tolist()
        ids = torch.tensor([prompt_ids + tokens])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(tokens))
        lp = log_probs[positions, torch.tensor(tokens)]
        weights = torch.tensor(1.0 - alpha * trie.ig_norm[nodes], dtype=torch.float32)
        total = float((lp * weights).sum())
        if mass is not None:
            parents = trie.parent[nodes]
            siblings = [mass[trie.child_start[p]:trie.child_start[p] + trie.child_count[p]].sum() for p in parents]
            tfa = np.log(mass[nodes] / np.asarray(siblings) + 1e-20)
            total = float(np.sum(guidance * ((lp * weights).double().numpy() - tfa) + tfa))
        scored[group] = total / len(tokens) ** length_penalty
    return sorted(scored.items(), key=lambda kv: -kv[1])

class CacheIgnoringModel(torch.nn.Module):
    """A causal LM whose forward drops the KV-cache argument, like a transformers version that silently
    ignores the keyword: every cached step then runs without the context before its new tokens."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module = model  # looked through like any wrapper when igdrec picks the cache keyword

    def forward(self, **kwargs):
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        return self.module(**kwargs)


def publish_sft(run: RunDir, model_dir: Path, name: str) -> Path:
    """Publish `<run>/sft/NAME/model` as `igdrec sft` would, holding a copy of the model in `model_dir`."""
    import shutil

    with StageWriter(run, f"sft/{name}", stage="sft", params={"fixture": str(model_dir.name)}, inputs={}, force=True) as out:
        target = out.path("model")
        shutil.copytree(model_dir, target, dirs_exist_ok=True)
    return run.stage_dir(f"sft/{name}") / "model"


# The decode tests' fixtures (tests/stages/test_decode.py, tests/unit/test_decoding.py import them by name).
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_peaked_model(tmp_path_factory.mktemp("peaked"))


@pytest.fixture()
def run(tmp_path, model_dir):
    run = synthetic_run(tmp_path / "run")
    publish_ig(run, load_tokenizer(str(model_dir)), str(model_dir))
    return run
