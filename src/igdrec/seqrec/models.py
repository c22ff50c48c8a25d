"""SASRec, GRU4Rec and most-popular behind one small protocol (RecBole 1.2's architectures and defaults).

Every model scores all n_items catalog items for a batch of histories (`full_sort_predict`) and turns
those scores into a distribution over the items (`item_probabilities`); a trainable model also gives the
loss of a batch (`calculate_loss`): full-softmax cross-entropy of the target among all items. The padding
index n_items has an embedding row (never a target, never scored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from igdrec.config import BASELINE_MODELS, BaselineConfig
from igdrec.seqrec.data import SequenceBatch


@runtime_checkable
class SequentialRecommender(Protocol):
    n_items: int

    def full_sort_predict(self, batch: SequenceBatch) -> torch.Tensor:
        """(B, n_items) scores, higher is better, columns in item-id order."""

    def item_probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, n_items) probabilities (rows sum to 1) from `full_sort_predict`'s scores."""


@runtime_checkable
class TrainableSequentialRecommender(SequentialRecommender, Protocol):
    def calculate_loss(self, batch: SequenceBatch) -> torch.Tensor:
        """Scalar training loss of the batch."""


@dataclass
class ModelSettings:
    """Architecture hyper-parameters, the fields of the same names of a `BaselineConfig` (which owns their
    defaults); None takes the model's RecBole 1.2 default (see `resolved`). model.json stores them."""

    hidden_size: int
    n_layers: int | None
    n_heads: int
    inner_size: int
    dropout: float | None
    attn_dropout: float
    gru_hidden_size: int

    @classmethod
    def from_config(cls, config: BaselineConfig) -> "ModelSettings":
        """The architecture of `config.model` that `config` describes, resolved to its defaults."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)}).resolved(config.model)

    def resolved(self, model: str) -> "ModelSettings":
        defaults = {"sasrec": (2, 0.5), "gru4rec": (1, 0.3)}.get(model, (None, None))
        return ModelSettings(
            hidden_size=self.hidden_size,
            n_layers=self.n_layers if self.n_layers is not None else defaults[0],
            n_heads=self.n_heads,
            inner_size=self.inner_size,
            dropout=self.dropout if self.dropout is not None else defaults[1],
            attn_dropout=self.attn_dropout,
            gru_hidden_size=self.gru_hidden_size,
        )


class _SoftmaxRecommender(nn.Module):
    """Shared part of the neural models: a sequence vector dotted with every item embedding."""

    n_items: int
    item_embedding: nn.Embedding

    def encode(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def full_sort_predict(self, batch: SequenceBatch) -> torch.Tensor:
        sequence = self.encode(batch.item_seq, batch.item_seq_len)
        return sequence @ self.item_embedding.weight[: self.n_items].T  # the padding row is no candidate

    def calculate_loss(self, batch: SequenceBatch) -> torch.Tensor:
        return F.cross_entropy(self.full_sort_predict(batch), batch.target)

    def item_probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores.float(), dim=-1)


def _last_position(states: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
    """(B, L, d) → (B, d): the state after the most recent history item."""
    index = (item_seq_len - 1).view(-1, 1, 1).expand(-1, 1, states.shape[-1])
    return states.gather(1, index).squeeze(1)


class _SelfAttention(nn.Module):
    """Multi-head self-attention with dropout on the attention probabilities, then residual + LayerNorm."""

    def __init__(self, hidden: int, heads: int, hidden_dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.output = nn.Linear(hidden, hidden)
        self.out_dropout = nn.Dropout(hidden_dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        b, length, hidden = x.shape
        split = lambda t: t.view(b, length, self.heads, hidden // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = q @ k.transpose(-1, -2) / math.sqrt(hidden // self.heads) + additive_mask
        context = self.attn_dropout(torch.softmax(logits, dim=-1)) @ v
        context = context.transpose(1, 2).reshape(b, length, hidden)
        return self.norm(x + self.out_dropout(self.output(context)))


class _FeedForward(nn.Module):
    """Position-wise two-layer network (exact erf GELU), then residual + LayerNorm."""

    def __init__(self, hidden: int, inner: int, dropout: float, eps: float):
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.down(F.gelu(self.up(x)))))


class SASRec(_SoftmaxRecommender):
    """Self-attentive sequential recommendation (Kang & McAuley 2018) as RecBole 1.2 builds it:
    learned positions, post-LayerNorm transformer blocks with a causal mask that also hides padding,
    the item embedding table shared between input and output, weights drawn from N(0, 0.02)."""

    LAYER_NORM_EPS = 1e-12
    INIT_STD = 0.02
    MASKED = -10000.0  # additive attention mask value, as RecBole (a finite value keeps every row defined)

    def __init__(self, n_items: int, max_len: int, settings: ModelSettings):
        super().__init__()
        s = settings.resolved("sasrec")
        self.n_items = n_items
        self.item_embedding = nn.Embedding(n_items + 1, s.hidden_size, padding_idx=n_items)
        self.position_embedding = nn.Embedding(max_len, s.hidden_size)
        self.input_norm = nn.LayerNorm(s.hidden_size, eps=self.LAYER_NORM_EPS)
        self.input_dropout = nn.Dropout(s.dropout)
        self.blocks = nn.ModuleList(
            nn.ModuleList([
                _SelfAttention(s.hidden_size, s.n_heads, s.dropout, s.attn_dropout, self.LAYER_NORM_EPS),
                _FeedForward(s.hidden_size, s.inner_size, s.dropout, self.LAYER_NORM_EPS),
            ])
            for _ in range(s.n_layers)
        )
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.INIT_STD)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        length = item_seq.shape[1]
        positions = torch.arange(length, device=item_seq.device)
        x = self.input_dropout(self.input_norm(self.item_embedding(item_seq) + self.position_embedding(positions)))
        # position t sees the real (non-padding) items at positions ≤ t
        visible = (item_seq != self.n_items)[:, None, None, :] & torch.ones(length, length, dtype=torch.bool, device=item_seq.device).tril()
        additive_mask = torch.where(visible, 0.0, self.MASKED).to(x.dtype)
        for attention, feed_forward in self.blocks:
            x = feed_forward(attention(x, additive_mask))
        return _last_position(x, item_seq_len)


class GRU4Rec(_SoftmaxRecommender):
    """GRU4Rec (Hidasi et al. 2016; Tan et al. 2016) as RecBole 1.2 builds it: dropout on the item
    embeddings, a bias-free GRU, a dense layer back to the embedding size, scores against the shared
    item embedding table; Xavier-normal embeddings, Xavier-uniform GRU weights."""

    def __init__(self, n_items: int, max_len: int, settings: ModelSettings):
        super().__init__()
        s = settings.resolved("gru4rec")
        self.n_items = n_items
        self.item_embedding = nn.Embedding(n_items + 1, s.hidden_size, padding_idx=n_items)
        self.embedding_dropout = nn.Dropout(s.dropout)
        self.gru = nn.GRU(s.hidden_size, s.gru_hidden_size, num_layers=s.n_layers, bias=False, batch_first=True)
        self.dense = nn.Linear(s.gru_hidden_size, s.hidden_size)
        nn.init.xavier_normal_(self.item_embedding.weight)
        for weight in self.gru.parameters():  # bias-free: every parameter is a weight matrix
            nn.init.xavier_uniform_(weight)

    def encode(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        # right padding comes after the last real item, so the state read at length - 1 never saw it
        states, _ = self.gru(self.embedding_dropout(self.item_embedding(item_seq)))
        return _last_position(self.dense(states), item_seq_len)


class MostPopular(nn.Module):
    """Every history gets the same scores: how often each item is a training target."""

    def __init__(self, n_items: int, train_targets: np.ndarray):
        super().__init__()
        self.n_items = n_items
        counts = np.bincount(np.asarray(train_targets, dtype=np.int64), minlength=n_items)
        self.register_buffer("counts", torch.from_numpy(counts.astype(np.float32)))

    def full_sort_predict(self, batch: SequenceBatch) -> torch.Tensor:
        return self.counts.expand(batch.item_seq.shape[0], -1)

    def item_probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """The training-target frequencies (an item never a target gets probability 0)."""
        scores = scores.float()
        return scores / scores.sum(dim=-1, keepdim=True)


def build_model(model: str, n_items: int, max_len: int, settings: ModelSettings, train_targets: np.ndarray) -> SequentialRecommender:
    if model == "sasrec":
        return SASRec(n_items, max_len, settings)
    if model == "gru4rec":
        return GRU4Rec(n_items, max_len, settings)
    if model == "pop":
        return MostPopular(n_items, train_targets)
    raise ValueError(f"unknown model {model!r}; known: {', '.join(BASELINE_MODELS)}")


def is_trainable(model: SequentialRecommender) -> bool:
    return isinstance(model, TrainableSequentialRecommender) and any(p.requires_grad for p in model.parameters())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
