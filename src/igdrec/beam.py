"""Batched beam search over the catalog trie with IG-calibrated step scores (docs/method.md §6).

The bookkeeping replicates transformers' `_beam_search` (v4.5x/5.x) exactly, so that on the same
prompts it returns the same hypotheses as `generate(num_beams=K)` with a catalog constraint:
  * each step ranks the best 2·K continuations of all live beams of a sample by accumulated score;
  * an EOS continuation becomes a finished hypothesis (score S / L^lp, L = generated tokens incl. EOS)
    only if it ranks within the first K of those 2·K; the best K non-EOS ones are the next live beams;
  * the finished set keeps the K best; a sample is done once its best live beam, divided by the
    current length^lp, can no longer beat its worst finished hypothesis (transformers'
    `early_stopping=False` heuristic) or the longest catalog sequence is reached.
What differs is only the machinery: the prompt is encoded once per sample and its KV cache shared by
that sample's beams; allowed tokens and their weights w_d = 1 - alpha * IG~ are gathered from the trie's
CSR arrays as tensors; finished samples leave the batch; and with `jump_forward`, a beam whose node
starts a forced (single-child) chain feeds the whole chain in the same forward pass as its chosen token
(rows with shorter chains are padded and masked), so later steps of that chain read their log-probs from
that pass and need no forward call while every live beam is still on its chain. A forced token has
IG~ = 0, so w_d = 1. None of this changes a score (beyond float noise of other batch shapes).

With a text-free assistant (`search(prompts, assistant_probs=q)`) every step score, forced ones included,
is D3's g·(llm − tfa) + tfa (igdrec.assistant); hypotheses still carry the model's own log p per token.
With `search(prompts, exclude=rows)` a sample's search never writes the excluded items: their leaves, and
every node all of whose items are excluded, are not allowed continuations for that sample (`dead_nodes`).
`self_check` verifies once that the model really uses the shared cache (CacheMismatchError otherwise).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import torch

from igdrec.assistant import MassTree, guided_step, node_mass, tfa_log_share
from igdrec.config import DecodeConfig
from igdrec.errors import IgdrecError
from igdrec.ig import CatalogTrie
from igdrec.modeling import kv_cache_kwargs
from igdrec.prompt import shared_prefix_len

NEG_INF = float("-inf")

def cache_check_tolerance(model: torch.nn.Module, dtype: torch.dtype, positions: int, scale: float) -> float:
    """How far logits through the KV cache may lie from a plain pass's without blame (docs/method.md §6.1).

    The two passes do the same arithmetic in other orders (other batch shapes and kernels sum the same terms
    in other blocks), so they may differ by rounding error only: a sum of n terms, in any order, lies within
    n·u of the exact one relative to the sum of the terms' magnitudes (u = 2^-24 for the fp32 accumulators
    of every kernel, also under autocast), and a half-precision result adds one rounding of its dtype. Over
    L layers the residual stream adds up each layer's error, and either pass may err the other way:

        tolerance = 2 · L · (n · u_accumulate + u_dtype) · max(1, max |logit|),

    n the widest sum (hidden size, MLP width or positions). A cache the model ignores moves the logits by
    most of their scale, far beyond it.
    """
    config = next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "num_hidden_layers")), None)
    layers = getattr(config, "num_hidden_layers", 1)
    terms = max(getattr(config, "hidden_size", 0), getattr(config, "intermediate_size", 0) or 0, positions)
    accumulate = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2
    return 2 * layers * (terms * accumulate + torch.finfo(dtype).eps / 2) * max(1.0, scale)


class CacheMismatchError(IgdrecError):
    """The model's logits through the shared KV cache differ from a plain forward pass: every decoded
    token would be conditioned on the wrong context (e.g. a transformers version ignoring the cache keyword)."""


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, EOS included (when it ended with one)
    score: float  # S / L^lp
    step_logprobs: list[float]  # model log p of each generated token (uncalibrated)
    nodes: list[int]  # trie node after each token (-1 without a trie)


@dataclass
class SearchStats:
    forward_calls: int = 0  # model forward passes (prefill included)
    forward_calls_saved: int = 0  # decoding steps whose forward pass jump-forward folded into another
    steps: int = 0
    prefix_passes: int = 0  # passes over a prompt prefix common to a batch (not counted in forward_calls)
    prefix_tokens_saved: int = 0  # prompt tokens the shared prefix spared the prefill

    def add(self, other: "SearchStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class TrieTensors:
    """The trie arrays beam search gathers from, as tensors on the decoding device."""

    child_start: torch.Tensor
    child_count: torch.Tensor
    token: torch.Tensor
    ig_norm: torch.Tensor
    max_depth: int
    max_children: int  # the widest node's child count: the candidate width of a search with static shapes
    # Jump-forward's forced chains, found once over the whole trie: `chain_len[v]` tokens are forced after
    # node v (it has one child, and that child is no EOS edge, and so on down), `forced_next[v]` is the
    # node after the first of them (v itself when none is forced).
    chain_len: torch.Tensor
    forced_next: torch.Tensor
    mass_tree: MassTree | None = None  # for a text-free assistant's item probabilities

    @classmethod
    def from_trie(cls, trie: CatalogTrie, device: torch.device | str = "cpu") -> "TrieTensors":
        def as_long(a):
            return torch.tensor(np.asarray(a, dtype=np.int64), device=device)

        chain_len, forced_next = forced_chains(trie)
        return cls(
            child_start=as_long(trie.child_start),
            child_count=as_long(trie.child_count),
            token=as_long(trie.token),
            ig_norm=torch.tensor(np.asarray(trie.ig_norm, dtype=np.float32), device=device),
            max_depth=trie.max_depth,
            max_children=max(int(np.max(trie.child_count, initial=0)), 1),
            chain_len=as_long(chain_len),
            forced_next=as_long(forced_next),
            mass_tree=MassTree.from_trie(trie, device),
        )

    def nbytes(self) -> int:
        """Bytes the search's trie tensors hold on the device (the assistant's mass tree included)."""
        tensors = [self.child_start, self.child_count, self.token, self.ig_norm, self.chain_len, self.forced_next]
        if self.mass_tree is not None:
            tensors += [self.mass_tree.item_leaf, self.mass_tree.parent]
        return sum(t.numel() * t.element_size() for t in tensors)


def forced_chains(trie: CatalogTrie) -> tuple[np.ndarray, np.ndarray]:
    """Per node v: how many tokens are forced after it, and the node after the first forced one (v when none).

    A token is forced where a node has one child and that child's edge is no EOS (an EOS edge ends an item
    and leads to a leaf). Nodes are numbered level by level, so one vectorised pass per level from the deepest
    sees every child's chain before its parent's: chain_len[v] = 1 + chain_len[child] for a forced v."""
    count = np.asarray(trie.child_count, dtype=np.int64)
    start = np.asarray(trie.child_start, dtype=np.int64)
    n = len(count)
    eos_tokens = np.unique(np.asarray(trie.token)[np.asarray(trie.item_leaf, dtype=np.int64)])
    child = np.where(count > 0, start, 0).clip(max=max(n - 1, 0))
    forced = (count == 1) & ~np.isin(np.asarray(trie.token)[child], eos_tokens) if n else np.zeros(0, bool)
    chain_len = np.zeros(n, dtype=np.int64)
    depth = np.asarray(trie.depth, dtype=np.int64)
    level_start = np.searchsorted(depth, np.arange(int(depth.max()) + 2)) if n else [0]
    for d in range(len(level_start) - 2, -1, -1):
        lo, hi = level_start[d], level_start[d + 1]
        level = np.arange(lo, hi)
        chain_len[level] = np.where(forced[level], 1 + chain_len[child[level]], 0)
    return chain_len, np.where(forced, child, np.arange(n))


@dataclass
class _ModelRows:
    """What the model has been fed, per cache row: the shared KV cache and what extending it needs.

    Besides the cache it keeps what was computed but not yet consumed by a decoding step: the logits
    after each row's last fed token (`last_logits`) and the model's log p of a forced chain pre-fed by
    jump-forward (`forced_lp[r, :chain_len[r]]`).
    """

    cache: object  # transformers DynamicCache
    attention: torch.Tensor  # (R, fed positions) 1 where a real token was fed
    next_position: torch.Tensor  # (R,) position id of the row's next token
    last_logits: torch.Tensor  # (R, V)
    forced_lp: torch.Tensor  # (R, longest chain)
    chain_len: torch.Tensor  # (R,)
    sample: torch.Tensor  # (R,) the sample (index in the `search` call) whose prompt the row holds...
    shared: int  # ...at its first `shared` positions

    def select(self, rows: torch.Tensor) -> None:
        """Reindex every row-wise tensor and the cache so that row i becomes old row rows[i]."""
        count = len(self.chain_len)
        if len(rows) == count and bool((rows == torch.arange(count, device=rows.device)).all()):
            return
        if len(rows) == count and bool((self.sample[rows] == self.sample).all()):
            self.reorder_within_samples(rows)
            for name in ("last_logits", "forced_lp", "chain_len"):
                setattr(self, name, getattr(self, name)[rows])
            return
        self.cache.reorder_cache(rows)
        for name in ("attention", "next_position", "last_logits", "forced_lp", "chain_len", "sample"):
            setattr(self, name, getattr(self, name)[rows])

    def reorder_within_samples(self, rows: torch.Tensor) -> None:
        """`select(rows)` for a `rows` that keeps every row within its sample, without reading it back,
        and leaving the logits and pre-fed chains (which the next pass writes for every row) as they are."""
        if _plain_layers(self.cache):
            # A sample's rows share the prompt's keys and values: copying the generated positions is enough,
            # a fraction of the cache.
            for layer in self.cache.layers:
                layer.keys[:, :, self.shared:] = layer.keys[rows, :, self.shared:]
                layer.values[:, :, self.shared:] = layer.values[rows, :, self.shared:]
        else:
            self.cache.reorder_cache(rows)
        self.attention, self.next_position = self.attention[rows], self.next_position[rows]


@dataclass
class _PromptPrefix:
    """A prompt prefix encoded once: its tokens and, per layer, its (1, heads, length, dim) keys and values."""

    tokens: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class _Beams:
    """Per active sample (dim 0) and beam (dim 1): the live beams, the finished hypotheses, and where
    each live beam's context lives in the model cache."""

    sample_of: torch.Tensor  # (A,) index of the sample in the `search` call
    running: torch.Tensor  # (A, K) accumulated score of each live beam, -inf for none
    tokens: torch.Tensor  # (A, K, T) generated tokens
    logps: torch.Tensor  # (A, K, T) model log p of each
    nodes: torch.Tensor  # (A, K, T) trie node after each (-1 without a trie)
    node: torch.Tensor  # (A, K) current trie node
    cache_row: torch.Tensor  # (A, K) the _ModelRows row holding the beam's context
    consumed: torch.Tensor  # (A, K) pre-fed chain entries of that row the beam has used
    improvable: torch.Tensor  # (A,) whether a live beam can still beat the worst finished hypothesis
    fin_scores: torch.Tensor  # (A, K) S / L^lp, -inf for none
    fin_len: torch.Tensor  # (A, K)
    fin_tokens: torch.Tensor  # (A, K, T)
    fin_logps: torch.Tensor  # (A, K, T)
    fin_nodes: torch.Tensor  # (A, K, T)

    @classmethod
    def start(cls, B: int, K: int, T: int, pad_token_id: int, device) -> "_Beams":
        running = torch.full((B, K), NEG_INF, device=device)
        running[:, 0] = 0.0  # only the first beam is live at the start: the others would duplicate it
        tokens = torch.full((B, K, T), pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros((B, K, T), device=device)
        nodes = torch.full((B, K, T), -1, dtype=torch.long, device=device)
        return cls(
            sample_of=torch.arange(B, device=device),
            running=running,
            tokens=tokens,
            logps=logps,
            nodes=nodes,
            node=torch.zeros((B, K), dtype=torch.long, device=device),
            cache_row=torch.arange(B * K, device=device).reshape(B, K),
            consumed=torch.zeros((B, K), dtype=torch.long, device=device),
            improvable=torch.ones(B, dtype=torch.bool, device=device),
            fin_scores=torch.full((B, K), NEG_INF, device=device),
            fin_len=torch.zeros((B, K), dtype=torch.long, device=device),
            fin_tokens=tokens.clone(),
            fin_logps=logps.clone(),
            fin_nodes=nodes.clone(),
        )

    def frozen_where(self, frozen: torch.Tensor, before: "_Beams") -> "_Beams":
        """This state, with the finished hypotheses of the `frozen` samples (A,) as they were `before`."""
        for name in ("fin_scores", "fin_len", "fin_tokens", "fin_logps", "fin_nodes"):
            new, old = getattr(self, name), getattr(before, name)
            setattr(self, name, torch.where(frozen.view(-1, *[1] * (new.dim() - 1)), old, new))
        return self

    def keep(self, samples: torch.Tensor) -> "_Beams":
        """The state of the samples selected by `samples` (a mask or indices over dim 0)."""
        return _Beams(**{f.name: getattr(self, f.name)[samples] for f in fields(self)})


@dataclass
class _Candidates:
    """Every continuation of every live beam, (A*K, M): M allowed tokens per beam (the vocabulary
    without a trie), -inf step score where a column is not allowed."""

    token: torch.Tensor
    node: torch.Tensor  # trie node after the token (-1 without a trie)
    step_score: torch.Tensor  # calibrated step score
    model_lp: torch.Tensor  # model log p


@dataclass
class _Top:
    """The best 2K continuations of each active sample, (A, 2K), best first."""

    score: torch.Tensor  # accumulated score
    beam: torch.Tensor  # the live beam each extends
    token: torch.Tensor
    node: torch.Tensor
    model_lp: torch.Tensor
    finishes: torch.Tensor  # ends the hypothesis (EOS, or max_new_tokens reached without a trie)


# The decode options a BeamSearch takes as they are: DecodeConfig declares (and defaults) them, see there.
SEARCH_OPTIONS = ("num_beams", "length_penalty", "alpha", "max_new_tokens", "jump_forward", "jump_fill", "tfa_guidance",
                  "constrained_softmax")


@dataclass
class BeamSearch:
    model: torch.nn.Module
    eos_token_id: int
    pad_token_id: int
    num_beams: int
    length_penalty: float
    alpha: float
    max_new_tokens: int | None  # None: the trie's depth
    # A jump-forward pass pads rows with shorter chains; it feeds only as far as real tokens fill at
    # least `jump_fill` of the live rows' slots. Pads cost compute like tokens, and rows fed to different
    # depths later need separate passes, so on CPU 1.0 (all rows jump together, no pads) is fastest;
    # lower values trade padding for fewer passes where a pass costs more than its tokens (GPU).
    jump_forward: bool
    jump_fill: float
    tfa_guidance: float  # g in D3's g·(llm − tfa) + tfa, used when search() gets assistant_probs
    constrained_softmax: bool  # normalise each step over the node's trie children (MSL fine-tunes; docs/method.md §6.8)
    # Encode the token prefix every prompt of a batch starts with (the prompt template's instruction, about a
    # third of an ml-100k prompt) once, and keep it for later batches that start with it too.
    share_prefix: bool
    trie: TrieTensors | None = None  # None = unconstrained generation
    autocast_dtype: torch.dtype | None = None
    # Once per BeamSearch (first forward pass at step >= 2): compare one beam's next-token logits through
    # the cache with a plain forward pass over its prompt and tokens; CacheMismatchError if they differ.
    self_check: bool = False
    # Leave dead beams (fewer than K continuations left) out of a forward pass when their padded slots would
    # cost more than copying the live rows' caches: late in a search most of a sample's K rows are dead.
    drop_dead_rows: bool = True
    # Static shapes (docs/method.md §6.1): every step feeds one token to all B·K rows, finished samples stay
    # in the batch (their results frozen) and the stop flag reaches the host without a wait, so a step reads
    # nothing back from the device (what a GPU needs to keep its queue full, and what torch.compile and CUDA
    # graphs need); jump-forward and the dropping of dead rows and finished samples, which change shapes, are
    # off. The default (dynamic) shrinks the passes instead, which is faster where the host is the device (CPU).
    static_shapes: bool = False
    # torch.compile the model's forward with this backend ("inductor"; "eager" checks the tracing only), None: off.
    compile_backend: str | None = None
    stats: SearchStats = field(default_factory=SearchStats)
    cache_check_gap: float | None = field(default=None, init=False)  # max |logit difference| the check saw
    _prefix: "_PromptPrefix | None" = field(default=None, init=False, repr=False)
    _compiled: "torch.nn.Module | None" = field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, config: DecodeConfig, **settings) -> "BeamSearch":
        """A search with the SEARCH_OPTIONS of `config`; `settings` gives the other fields (or replaces one)."""
        return cls(model, eos_token_id, pad_token_id, **({name: getattr(config, name) for name in SEARCH_OPTIONS} | settings))

    @torch.no_grad()
    def search(self, prompts: list[list[int]], assistant_probs: torch.Tensor | np.ndarray | None = None,
               exclude: Sequence[Sequence[int]] | None = None) -> list[list[Hypothesis]]:
        """The finished hypotheses of each prompt, best first (at most num_beams of them).

        `assistant_probs` (len(prompts), n catalog items), aligned with the trie's item rows, turns on
        D3's text-free assistant: every step score becomes g·(llm − tfa) + tfa (igdrec.assistant).
        `exclude`: per prompt, trie item rows the search must not return (nor any item sharing their
        token sequence): the search over the catalog without them, with the same model step scores (an
        assistant's shares are renormalised over the children left).
        """
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        T = self.max_new_tokens or (self.trie.max_depth if self.trie is not None else None)
        if T is None:
            raise ValueError("unconstrained search needs max_new_tokens")
        mass = None
        if assistant_probs is not None:
            if self.trie is None or self.trie.mass_tree is None:
                raise ValueError("a text-free assistant needs the catalog trie (TrieTensors.from_trie)")
            mass = node_mass(self.trie.mass_tree, assistant_probs)
            if mass.shape[0] != len(prompts):
                raise ValueError(f"assistant probabilities for {mass.shape[0]} samples, but {len(prompts)} prompts")
        dead = None
        if exclude is not None:
            if self.trie is None or self.trie.mass_tree is None:
                raise ValueError("excluding items needs the catalog trie (TrieTensors.from_trie)")
            if len(exclude) != len(prompts):
                raise ValueError(f"excluded items for {len(exclude)} samples, but {len(prompts)} prompts")
            dead = dead_nodes(self.trie, exclude)
        rows = self._prefill(prompts, T, device)
        beams = _Beams.start(len(prompts), self.num_beams, T, self.pad_token_id, device)
        if self.static_shapes:
            return self._search_static(prompts, rows, beams, T, mass, dead)
        results: list[list[Hypothesis]] = [[] for _ in prompts]
        for t in range(T):
            fed = self._feed(rows, beams, t, T)
            if fed is None:
                if t > 0:
                    self.stats.forward_calls_saved += 1  # every live beam's next log p was already computed
            elif self.self_check and self.cache_check_gap is None and t >= 2:
                self._check_cache(prompts, rows, beams, fed, t)
            self.stats.steps += 1
            candidates = self._candidates(rows, beams, mass, dead)
            top = self._best_continuations(beams, candidates, t, T)
            beams = self._advance(beams, top, t)
            done = ~beams.improvable | ~torch.isfinite(beams.running).any(dim=1) | (t + 1 == T)
            if done.any():
                finished = beams.keep(done)
                for sample, hypotheses in zip(finished.sample_of.tolist(), self._collect(finished)):
                    results[sample] = hypotheses
                if bool(done.all()):
                    break
                beams = beams.keep(~done)
        return results

    def _search_static(self, prompts, rows: _ModelRows, beams: _Beams, T: int, mass, dead) -> list[list[Hypothesis]]:
        """`search` with static shapes: no step reads from the device (see `static_shapes`). A finished
        sample keeps its place; its finished set is frozen from the step it finished on, so it ends as it
        would have had it left the batch then."""
        done = torch.zeros(beams.running.shape[0], dtype=torch.bool, device=beams.running.device)
        stop = _StopFlag(done.device)
        ready_mask = _sdpa_attention(self.model)
        for t in range(T):
            fed = self._feed_static(rows, beams, t, ready_mask)
            if fed is not None and self.self_check and self.cache_check_gap is None and t >= 2:
                self._check_cache(prompts, rows, beams, fed, t)
            self.stats.steps += 1
            candidates = self._candidates(rows, beams, mass, dead)
            top = self._best_continuations(beams, candidates, t, T)
            beams = self._advance(beams, top, t).frozen_where(done, beams)
            done = done | ~beams.improvable | ~torch.isfinite(beams.running).any(dim=1)
            if t + 1 < T and stop.all_done(done):
                break
        return self._collect(beams)

    # --- the steps of a search -----------------------------------------------------------------------
    def _prefill(self, prompts: list[list[int]], T: int, device) -> _ModelRows:
        """Encode the prompts once; the cache is then shared by each sample's K beams.

        With a shared prefix of p tokens the cache is laid out as [prefix | left-padded rests]: the prefix's
        keys and values (computed once, position ids 0..p-1) in front of every row, then each row's own
        tokens at positions p, p+1, ...; the padding between them is masked, so every row attends to
        exactly its own prompt, as with plain left padding.
        """
        from transformers import DynamicCache

        K, B = self.num_beams, len(prompts)
        prefix = self._shared_prefix(prompts, device)
        p = prefix.length if prefix is not None else 0
        width = max(len(q) for q in prompts) - p
        input_ids = torch.full((B, width), self.pad_token_id, dtype=torch.long, device=device)
        attention = torch.zeros((B, width), dtype=torch.long, device=device)
        for i, q in enumerate(prompts):
            input_ids[i, width - (len(q) - p):] = torch.tensor(q[p:], dtype=torch.long, device=device)
            attention[i, width - (len(q) - p):] = 1
        positions = p + (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        if prefix is not None:
            for index, (keys, values) in enumerate(prefix.layers):
                cache.update(keys.expand(B, -1, -1, -1), values.expand(B, -1, -1, -1), index)
            attention = torch.cat([attention.new_ones((B, p)), attention], dim=1)
            self.stats.prefix_tokens_saved += B * p  # less the prefix pass, counted where it runs
        logits = self._forward(input_ids, attention, positions, cache, keep=1)
        _repeat_for_beams(cache, K, room=T + 1)
        return _ModelRows(
            cache=cache,
            attention=attention.repeat_interleave(K, dim=0),
            next_position=positions[:, -1].repeat_interleave(K) + 1,
            last_logits=logits[:, -1].repeat_interleave(K, dim=0),
            forced_lp=torch.zeros((B * K, 0), device=device),
            chain_len=torch.zeros(B * K, dtype=torch.long, device=device),
            sample=torch.arange(B, device=device).repeat_interleave(K),
            shared=p + width,
        )

    def _shared_prefix(self, prompts: list[list[int]], device) -> "_PromptPrefix | None":
        """The encoded token prefix all `prompts` start with (the kept one when they all start with it), or
        None. Every row keeps at least its last token outside the prefix: its logits start the search."""
        if not self.share_prefix:
            return None
        room = min(len(q) for q in prompts) - 1
        kept = self._prefix
        if kept is not None and kept.length <= room and all(q[:kept.length] == kept.tokens for q in prompts):
            return kept
        if len(prompts) < 2:
            return None  # a prefix pass would save nothing
        length = shared_prefix_len(prompts, [len(q) for q in prompts])
        if length == 0:
            return None
        from transformers import DynamicCache

        tokens = list(prompts[0][:length])
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        cache = DynamicCache()
        self._forward(ids, torch.ones_like(ids), torch.arange(length, device=device)[None], cache, keep=1, decoding=False)
        self.stats.prefix_passes += 1
        self.stats.prefix_tokens_saved -= length
        if not _plain_layers(cache):  # keys and values not in the (batch, heads, positions, dim) layout we expand
            self.share_prefix = False  # this model's cache never will be: no more prefix passes
            return None
        self._prefix = _PromptPrefix(tokens, [(layer.keys, layer.values) for layer in cache.layers])
        return self._prefix

    def _feed(self, rows: _ModelRows, beams: _Beams, t: int, T: int):
        """Run the model for every live beam whose next log-probs are not computed yet.

        The cache is first brought into beam order: row i = flat beam i, or, when most beams are dead
        (their padded slots would cost more than copying the live rows' caches, about one slot per row),
        row i = the i-th live beam and the dead ones drop out of the pass. Each beam that needs logits feeds
        the token it chose last step plus, with jump-forward, the forced chain after it; the others feed
        nothing. Returns None when no beam needed the model, else (flat beam of each row, needs, fed tokens,
        fed mask) over the rows of the pass.
        """
        live = torch.isfinite(beams.running).flatten()
        cache_row = beams.cache_row.flatten()
        needs = live & (beams.consumed.flatten() > rows.chain_len[cache_row])
        if not needs.any():
            return None
        device = needs.device
        n_live = int(live.sum())
        chain, lengths = self._forced_chains(beams.node.flatten(), needs, T - t)
        lengths = self._affordable(lengths, needs, n_live)
        n = int(lengths.max()) + 1
        if self.drop_dead_rows and (len(live) - n_live) * n > n_live:
            beam_of_row = torch.nonzero(live).flatten()
            rows.select(cache_row[beam_of_row])
        else:
            beam_of_row = torch.arange(len(live), device=device)
            rows.select(cache_row)
        needs, lengths, chain = needs[beam_of_row], lengths[beam_of_row], chain[beam_of_row, : n - 1]
        feed = torch.cat([beams.tokens[:, :, t - 1].reshape(-1)[beam_of_row, None], chain], dim=1)
        fed = needs[:, None] & (torch.arange(n, device=device)[None, :] <= lengths[:, None])
        feed = torch.where(fed, feed, self.pad_token_id)
        rows.attention = torch.cat([rows.attention, fed.long()], dim=1)
        positions = rows.next_position[:, None] + torch.arange(n, device=device)
        rows.next_position = rows.next_position + fed.sum(dim=1)
        logits = self._forward(feed, rows.attention, positions, rows.cache, keep=n)
        rows_fed = torch.nonzero(needs).flatten()
        rows.last_logits[rows_fed] = logits[rows_fed, lengths[rows_fed]].to(rows.last_logits.dtype)
        if n > 1:
            chain_lp = torch.log_softmax(logits[rows_fed, : n - 1].float(), dim=-1)
            chain_lp = chain_lp.gather(2, chain[rows_fed][:, :, None])[:, :, 0]
            width = max(rows.forced_lp.shape[1], n - 1)
            rows.forced_lp = torch.nn.functional.pad(rows.forced_lp, (0, width - rows.forced_lp.shape[1]))
            rows.forced_lp[rows_fed] = torch.nn.functional.pad(chain_lp, (0, width - (n - 1)))
        rows.chain_len[rows_fed] = lengths[rows_fed]
        A, K = beams.running.shape
        consumed = beams.consumed.flatten().clone()
        consumed[beam_of_row[rows_fed]] = 0
        beams.consumed = consumed.reshape(A, K)
        row_of_beam = torch.zeros(A * K, dtype=torch.long, device=device)
        row_of_beam[beam_of_row] = torch.arange(len(beam_of_row), device=device)
        row_of_beam = row_of_beam.reshape(A, K)
        # A dead beam's row is never read, but the next pass in beam order copies it to the beam's place; one
        # of its own sample keeps that copy within samples (cheap, see `select`): the sample's first live beam's.
        first_live = torch.argmax(live.reshape(A, K).to(torch.uint8), dim=1)  # every active sample has one
        own_sample = row_of_beam.gather(1, first_live[:, None]).expand(A, K)
        beams.cache_row = torch.where(live.reshape(A, K), row_of_beam, own_sample)
        return beam_of_row, needs, feed, fed

    def _feed_static(self, rows: _ModelRows, beams: _Beams, t: int, ready_mask: bool):
        """`_feed` with static shapes: from step 1 on, row i = flat beam i feeds the token that beam chose
        last step (a dead beam's row a masked pad); `ready_mask`: hand the model an SDPA mask. Same return
        value as `_feed`."""
        if t == 0:
            return None  # the prefill computed every beam's first log-probs
        A, K = beams.running.shape
        live = torch.isfinite(beams.running).flatten()
        rows.reorder_within_samples(beams.cache_row.flatten())
        feed = torch.where(live, beams.tokens[:, :, t - 1].reshape(-1), self.pad_token_id)[:, None]
        rows.attention = torch.cat([rows.attention, live.long()[:, None]], dim=1)
        positions = rows.next_position[:, None]
        rows.next_position = rows.next_position + live
        mask = rows.attention
        if ready_mask:
            # SDPA's (rows, 1, query, key) boolean mask, which transformers takes as it is: from a 2D mask it
            # would build it itself, after reading whether every position is real (a wait for the device)
            mask = mask.bool()[:, None, None, :]
        rows.last_logits = self._forward(feed, mask, positions, rows.cache, keep=1)[:, 0].to(rows.last_logits.dtype)
        beams.cache_row = torch.arange(A * K, device=live.device).reshape(A, K)
        beams.consumed = torch.zeros_like(beams.consumed)
        return beams.cache_row.flatten(), live, feed, live[:, None]

    def _candidates(self, rows: _ModelRows, beams: _Beams, mass: torch.Tensor | None, dead: torch.Tensor | None) -> _Candidates:
        """Allowed children of each beam's node (or the whole vocabulary) with their step scores; `mass`
        (samples, trie nodes) is the assistant's Q per node, None without an assistant; `dead` the sorted
        keys of excluded nodes (`dead_nodes`), None when nothing is excluded."""
        cache_row = beams.cache_row.flatten()
        consumed = beams.consumed.flatten()
        from_chain = consumed < rows.chain_len[cache_row]  # this step's (forced) token was pre-fed
        log_probs = torch.log_softmax(rows.last_logits[cache_row].float(), dim=-1)
        if rows.forced_lp.shape[1]:
            chained = rows.forced_lp[cache_row].gather(1, consumed.clamp(max=rows.forced_lp.shape[1] - 1)[:, None])
        else:
            chained = log_probs.new_zeros((len(cache_row), 1))
        if self.trie is None:
            M = log_probs.shape[1]
            node = torch.full((len(cache_row), M), -1, dtype=torch.long, device=log_probs.device)
            token = torch.arange(M, device=log_probs.device).expand(len(cache_row), M)
            return _Candidates(token=token, node=node, step_score=log_probs, model_lp=log_probs)
        flat_node = beams.node.flatten()
        count = torch.where(torch.isfinite(beams.running).flatten(), self.trie.child_count[flat_node], 0)
        M = self.trie.max_children if self.static_shapes else max(int(count.max()), 1)
        offset = torch.arange(M, device=count.device)
        allowed = offset[None, :] < count[:, None]
        child = torch.where(allowed, self.trie.child_start[flat_node][:, None] + offset, 0)
        children_lp = log_probs.gather(1, torch.where(allowed, self.trie.token[child], 0))
        if self.constrained_softmax:  # over the node's children, before exclusions; a forced token scores 0
            norm = torch.logsumexp(children_lp.masked_fill(~allowed, NEG_INF), dim=1, keepdim=True)
            children_lp, chained = children_lp - torch.where(torch.isfinite(norm), norm, 0.0), torch.zeros_like(chained)
        sample = beams.sample_of.repeat_interleave(beams.running.shape[1])
        if dead is not None:
            key = sample[:, None] * len(self.trie.child_count) + child
            allowed &= dead[torch.searchsorted(dead, key).clamp(max=len(dead) - 1)] != key
        token = torch.where(allowed, self.trie.token[child], 0)
        # a pre-fed row has exactly one allowed token, in column 0
        model_lp = torch.where(from_chain[:, None], chained, children_lp)
        child_mass = None if mass is None else mass[sample[:, None], child]
        step = step_scores(model_lp, self.trie.ig_norm[child], allowed, self.alpha, child_mass, self.tfa_guidance)
        return _Candidates(token=token, node=child, step_score=step, model_lp=model_lp)

    def _best_continuations(self, beams: _Beams, candidates: _Candidates, t: int, T: int) -> _Top:
        """Each sample's 2K best continuations by accumulated score (missing ones are -inf)."""
        A, K = beams.running.shape
        M = candidates.token.shape[1]
        scores = (beams.running.reshape(-1, 1) + candidates.step_score).reshape(A, K * M)
        width = min(2 * K, K * M)
        top_scores, top_index = torch.topk(scores, width, dim=1)
        if width < 2 * K:
            pad = 2 * K - width
            top_scores = torch.cat([top_scores, top_scores.new_full((A, pad), NEG_INF)], dim=1)
            top_index = torch.cat([top_index, top_index[:, :1].expand(A, pad)], dim=1)
        token = candidates.token.reshape(A, K * M).gather(1, top_index)
        finishes = token == self.eos_token_id
        if self.trie is None and t + 1 == T:
            finishes = torch.ones_like(finishes)  # max_new_tokens reached: every continuation stops
        return _Top(
            score=top_scores,
            beam=top_index // M,
            token=token,
            node=candidates.node.reshape(A, K * M).gather(1, top_index),
            model_lp=candidates.model_lp.reshape(A, K * M).gather(1, top_index),
            finishes=finishes,
        )

    def _advance(self, beams: _Beams, top: _Top, t: int) -> _Beams:
        """The state after step t: the best K continuations that did not finish become the live beams,
        EOS continuations within the first K join the finished set, and the stopping rule is updated."""
        A, K = beams.running.shape
        T = beams.tokens.shape[2]
        beam3 = top.beam[:, :, None].expand(-1, -1, T)

        def extend(history: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            out = history.gather(1, beam3).clone()
            out[:, :, t] = new
            return out

        cand_tokens, cand_logps, cand_nodes = extend(beams.tokens, top.token), extend(beams.logps, top.model_lp), extend(beams.nodes, top.node)

        # --- the next live beams: the best K continuations that did not finish
        running, keep = torch.topk(torch.where(top.finishes, NEG_INF, top.score), K, dim=1)
        keep3 = keep[:, :, None].expand(-1, -1, T)
        source_beam = top.beam.gather(1, keep)

        # --- finished hypotheses: EOS within the first K, while the sample can still improve
        new_fin = top.finishes & torch.isfinite(top.score) & beams.improvable[:, None]
        new_fin[:, K:] = False
        fin_candidates = torch.where(new_fin, hypothesis_score(top.score, t + 1, self.length_penalty), NEG_INF)
        fin_scores, pick = torch.topk(torch.cat([beams.fin_scores, fin_candidates], dim=1), K, dim=1)
        pick3 = pick[:, :, None].expand(-1, -1, T)

        # --- stopping rule (transformers' early_stopping=False heuristic)
        best_possible = running[:, 0] / ((t + 1) ** self.length_penalty)
        improvable = beams.improvable & (best_possible > fin_scores.min(dim=1).values)

        return _Beams(
            sample_of=beams.sample_of,
            running=running,
            tokens=cand_tokens.gather(1, keep3),
            logps=cand_logps.gather(1, keep3),
            nodes=cand_nodes.gather(1, keep3),
            node=top.node.gather(1, keep).clamp(min=0),
            cache_row=beams.cache_row.gather(1, source_beam),
            consumed=(beams.consumed + 1).gather(1, source_beam),
            improvable=improvable,
            fin_scores=fin_scores,
            fin_len=torch.cat([beams.fin_len, beams.fin_len.new_full((A, 2 * K), t + 1)], dim=1).gather(1, pick),
            fin_tokens=torch.cat([beams.fin_tokens, cand_tokens], dim=1).gather(1, pick3),
            fin_logps=torch.cat([beams.fin_logps, cand_logps], dim=1).gather(1, pick3),
            fin_nodes=torch.cat([beams.fin_nodes, cand_nodes], dim=1).gather(1, pick3),
        )

    # --- helpers ----------------------------------------------------------------------------------------
    def _check_cache(self, prompts: list[list[int]], rows: _ModelRows, beams: _Beams, fed, t: int) -> None:
        """Raise CacheMismatchError unless the logits the last pass computed through the cache for the first
        fed beam match a plain forward pass over its prompt and every token it has fed."""
        beam_of_row, needs, feed, fed_mask = fed
        r = int(torch.nonzero(needs)[0])
        a, k = divmod(int(beam_of_row[r]), beams.running.shape[1])
        sequence = prompts[int(beams.sample_of[a])] + beams.tokens[a, k, : t - 1].tolist() + feed[r][fed_mask[r]].tolist()
        ids = torch.tensor([sequence], dtype=torch.long, device=needs.device)
        plain = self._forward(ids, torch.ones_like(ids), torch.arange(len(sequence), device=ids.device)[None, :], None, keep=1)
        plain, cached = plain[0, -1].float(), rows.last_logits[r].float()
        gap = float((cached - plain).abs().max())
        dtype = self.autocast_dtype or next(self.model.parameters()).dtype
        tolerance = cache_check_tolerance(self.model, dtype, len(sequence), float(plain.abs().max()))
        if not gap <= tolerance:  # NaN fails too
            import transformers

            raise CacheMismatchError(
                f"KV-cache self-check failed for model {_model_name(self.model)!r} (torch {torch.__version__}, "
                f"transformers {transformers.__version__}): next-token logits through the cache differ from a plain "
                f"forward pass by {gap:.3g} (tolerance {tolerance:.2g} for {str(dtype).removeprefix('torch.')}); "
                "this transformers version likely ignores the cache keyword, so every decoded token would be wrong"
            )
        self.cache_check_gap = gap

    def _forward(self, input_ids, attention, positions, cache, keep: int, decoding: bool = True) -> torch.Tensor:
        """The one place the model is called; `cache` None is a plain pass (the self-check's). Only decoding
        passes (prefill and steps; `decoding`) count as forward calls."""
        if cache is not None and decoding:
            self.stats.forward_calls += 1
        autocast = (
            torch.autocast(device_type=input_ids.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        if self.compile_backend is not None and self._compiled is None:
            # dynamic: the cache grows by a position every step, which must not compile anew each time
            self._compiled = torch.compile(self.model, backend=self.compile_backend, dynamic=True)
        with autocast:
            out = (self.model if self._compiled is None else self._compiled)(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                **kv_cache_kwargs(self.model, cache),
                use_cache=cache is not None,
                logits_to_keep=keep,
            )
        return out.logits[:, -keep:]

    def _forced_chains(self, nodes: torch.Tensor, rows: torch.Tensor, room: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row in `rows`: the tokens it is forced to write next (until its node branches or its
        next token is EOS, at most room - 1), as a pad-filled matrix, and each row's chain length."""
        if not (self.jump_forward and self.trie is not None):
            return torch.zeros((len(nodes), 0), dtype=torch.long, device=nodes.device), torch.zeros_like(nodes)
        lengths = torch.where(rows, self.trie.chain_len[nodes], 0).clamp(max=room - 1)
        width = int(lengths.max()) if len(lengths) else 0
        columns, current = [], nodes
        for j in range(width):
            current = self.trie.forced_next[current]
            columns.append(torch.where(j < lengths, self.trie.token[current], self.pad_token_id))
        chain = torch.stack(columns, dim=1) if columns else torch.zeros((len(nodes), 0), dtype=torch.long, device=nodes.device)
        return chain, lengths

    def _affordable(self, lengths: torch.Tensor, rows: torch.Tensor, live: int) -> torch.Tensor:
        """Chain lengths cut to the widest pass whose real tokens fill `jump_fill` of the live rows' slots."""
        if not bool((lengths > 0).any()):
            return lengths
        widths = torch.arange(1, int(lengths.max()) + 2, device=lengths.device)
        real = torch.minimum(lengths[rows][None, :] + 1, widths[:, None]).sum(dim=1)
        fits = real >= self.jump_fill * live * widths
        width = int(widths[fits].max()) if bool(fits.any()) else 1
        return lengths.clamp(max=width - 1)

    @staticmethod
    def _collect(beams: _Beams) -> list[list[Hypothesis]]:
        """The finished hypotheses of every active sample, best first (one read from the device per field)."""
        scores, lengths = beams.fin_scores.cpu().numpy(), beams.fin_len.cpu().numpy()
        tokens, nodes = beams.fin_tokens.cpu().numpy(), beams.fin_nodes.cpu().numpy()
        logps = beams.fin_logps.cpu().numpy().astype(np.float64)
        out = []
        for a in range(len(scores)):
            hypotheses = []
            for k in np.flatnonzero(np.isfinite(scores[a])):
                n = int(lengths[a, k])
                hypotheses.append(Hypothesis(tokens=tokens[a, k, :n].tolist(), score=float(scores[a, k]),
                                             step_logprobs=logps[a, k, :n].tolist(), nodes=nodes[a, k, :n].tolist()))
            out.append(hypotheses)
        return out


def step_scores(model_lp: torch.Tensor, ig_norm: torch.Tensor, allowed: torch.Tensor, alpha: float,
                child_mass: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """The calibrated step score of each allowed child of a node (docs/method.md §6), -inf elsewhere.

    (rows, children) tensors: the model's log p of each child's token, its IG~, whether it is allowed and,
    with a text-free assistant, its mass Q (None without one). w_d = 1 − α·IG~ weighs log p; the assistant
    then mixes in g·(llm − tfa) + tfa, its share taken over the allowed siblings. The search and the
    teacher-forced scorer (igdrec.search_errors) both call this, so their scores agree by construction.
    """
    step = model_lp
    if alpha:
        step = step * (1.0 - alpha * ig_norm)
    if child_mass is not None:
        step = guided_step(step, tfa_log_share(child_mass, allowed), guidance)
    return torch.where(allowed, step, NEG_INF)


def hypothesis_score(total, length: int, length_penalty: float):
    """A finished hypothesis' score S / L^lp: S its summed step scores, L its tokens (EOS included)."""
    return total / (length ** length_penalty)


class _StopFlag:
    """Whether every sample of a static-shape search is done, brought to the host without stalling the device.

    Each step's flag is copied into host memory (pinned, on CUDA) without waiting, and read once its copy
    has landed: on CUDA the host looks at the flag of an earlier step whose copy is complete, and waits
    only for one `lag` steps old, so the device always has the newer steps queued (at most `lag` steps
    run past the end, their results frozen). On a CPU the copy lands at once and the flag is exact."""

    lag = 2

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffers = [torch.zeros((), dtype=torch.bool, pin_memory=self.cuda) for _ in range(self.lag + 1)]
        self.views = [b.numpy() for b in self.buffers]  # numpy views of the host buffers, made once
        self.pending: list[tuple[int, object]] = []  # (buffer, its copy's CUDA event), oldest first
        self.step = 0

    def all_done(self, done: torch.Tensor) -> bool:
        slot = self.step % len(self.buffers)
        self.step += 1
        self.buffers[slot].copy_(done.all(), non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((slot, event))
        while self.pending:
            slot, event = self.pending[0]
            if event is not None and len(self.pending) <= self.lag and not event.query():
                return False  # newest flags still in flight; nothing old enough to wait for
            if event is not None:
                event.synchronize()
            self.pending.pop(0)
            if self.views[slot][()]:
                return True
        return False


def dead_nodes(trie: TrieTensors, exclude: Sequence[Sequence[int]]) -> torch.Tensor | None:
    """Sorted keys sample · n_nodes + node of the trie nodes no allowed item lies under, for each sample's
    excluded item rows: the excluded items' leaves (shared by every item with the same token sequence)
    and, level by level from the deepest, every node all of whose children are dead. A beam can then
    never enter a prefix whose every completion is excluded. None when nothing is excluded."""
    tree = trie.mass_tree
    n, device = tree.num_nodes, tree.parent.device
    leaves = [s * n + tree.item_leaf[torch.as_tensor(list(rows), dtype=torch.long, device=device)]
              for s, rows in enumerate(exclude) if len(rows)]
    if not leaves:
        return None
    dead = torch.unique(torch.cat(leaves))
    for d in range(len(tree.level_start) - 2, 0, -1):  # the children of a node all lie one level below it
        node = dead % n
        level = dead[(node >= tree.level_start[d]) & (node < tree.level_start[d + 1])]
        if len(level):
            parents, dead_children = torch.unique(level - level % n + tree.parent[level % n], return_counts=True)
            dead = torch.cat([dead, parents[dead_children == trie.child_count[parents % n]]])
    return torch.sort(dead).values


def _sdpa_attention(model: torch.nn.Module) -> bool:
    """Whether the model attends with SDPA (transformers' or igdrec's GQA kernel), whose masks are boolean
    (rows, 1, query, key) tensors, True where a key is seen."""
    from igdrec.modeling import GQA_SDPA

    config = next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "num_hidden_layers")), None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", GQA_SDPA)


def _plain_layers(cache) -> bool:
    """Whether every cache layer is a plain DynamicLayer (or our in-place one): (batch, heads, positions,
    dim) keys and values holding every fed position (no sliding window, no extra state), safe to reindex
    in place."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(
        type(layer) in (DynamicLayer, _appending_layer_class()) and layer.keys is not None and layer.keys.dim() == 4 for layer in layers
    )


@functools.cache
def _appending_layer_class():
    """A DynamicLayer that writes new positions into spare room of preallocated key/value buffers instead
    of concatenating: DynamicLayer copies the whole cache on every forward pass, this only the new tokens.

    (Built on first use so that importing igdrec.beam does not import transformers.)"""
    from transformers.cache_utils import DynamicLayer

    class AppendingLayer(DynamicLayer):
        room = 0  # spare positions a (re)allocation reserves

        def update(self, key_states, value_states, *args, **kwargs):
            buffers = getattr(self, "buffers", None)
            length, new = self.keys.shape[-2], key_states.shape[-2]
            if (
                buffers is None
                or self.keys.data_ptr() != buffers[0].data_ptr()
                or self.values.data_ptr() != buffers[1].data_ptr()
                or self.keys.shape[:2] != buffers[0].shape[:2]
                or length + new > buffers[0].shape[2]
            ):  # first use, a reorder made new tensors, or out of room: start new buffers
                buffers = tuple(
                    torch.cat([old, fresh, fresh.new_empty((*fresh.shape[:2], max(self.room, new), fresh.shape[3]))], dim=2)
                    for old, fresh in ((self.keys, key_states), (self.values, value_states))
                )
                self.buffers = buffers
            else:
                buffers[0][:, :, length:length + new] = key_states
                buffers[1][:, :, length:length + new] = value_states
            self.keys = buffers[0][:, :, :length + new]
            self.values = buffers[1][:, :, :length + new]
            return self.keys, self.values

    return AppendingLayer


def _repeat_for_beams(cache, K: int, room: int) -> None:
    """Give each of a filled cache's B rows to K beams: row b becomes rows b·K … b·K + K − 1, in appending
    layers with `room` spare positions. The prompt's keys and values are written once into the new buffers
    (repeating them first and growing the copy at the first step would move them twice)."""
    from transformers.cache_utils import DynamicLayer

    layer_class = _appending_layer_class()
    for i, layer in enumerate(getattr(cache, "layers", [])):
        if not (type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4):
            layer.batch_repeat_interleave(K)  # another layout: repeated as transformers does it
            continue
        B, heads, length, dim = layer.keys.shape
        buffers = []
        for old in (layer.keys, layer.values):
            buffer = old.new_empty((B * K, heads, length + room, dim))
            buffer[:, :, :length].unflatten(0, (B, K)).copy_(old[:, None])
            buffers.append(buffer)
        appending = layer_class.__new__(layer_class)
        appending.__dict__.update(layer.__dict__)
        appending.room, appending.buffers = room, tuple(buffers)
        appending.keys, appending.values = buffers[0][:, :, :length], buffers[1][:, :, :length]
        cache.layers[i] = appending


def _model_name(model: torch.nn.Module) -> str:
    """The checkpoint a model (or a wrapper around one) was loaded from."""
    for module in model.modules():
        name = getattr(module, "name_or_path", None) or getattr(getattr(module, "config", None), "_name_or_path", None)
        if name:
            return str(name)
    return type(model).__name__
