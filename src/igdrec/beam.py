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
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from igdrec.ig import CatalogTrie
from igdrec.modeling import kv_cache_kwargs

NEG_INF = float("-inf")


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

    def add(self, other: "SearchStats") -> None:
        self.forward_calls += other.forward_calls
        self.forward_calls_saved += other.forward_calls_saved
        self.steps += other.steps


@dataclass
class TrieTensors:
    """The trie arrays beam search gathers from, as tensors on the decoding device."""

    child_start: torch.Tensor
    child_count: torch.Tensor
    token: torch.Tensor
    ig_norm: torch.Tensor
    max_depth: int

    @classmethod
    def from_trie(cls, trie: CatalogTrie, device: torch.device | str = "cpu") -> "TrieTensors":
        def as_long(a):
            return torch.tensor(np.asarray(a, dtype=np.int64), device=device)

        return cls(
            child_start=as_long(trie.child_start),
            child_count=as_long(trie.child_count),
            token=as_long(trie.token),
            ig_norm=torch.tensor(np.asarray(trie.ig_norm, dtype=np.float32), device=device),
            max_depth=trie.max_depth,
        )


@dataclass
class BeamSearch:
    model: torch.nn.Module
    eos_token_id: int
    pad_token_id: int
    num_beams: int = 10
    length_penalty: float = 1.0
    alpha: float = 0.0
    trie: TrieTensors | None = None  # None = unconstrained generation
    max_new_tokens: int | None = None  # default: the trie's depth
    jump_forward: bool = True
    # A jump-forward pass pads rows with shorter chains; it feeds only as far as real tokens fill at
    # least this share of the live rows' slots. Pads cost compute like tokens, and rows fed to different
    # depths later need separate passes, so on CPU 1.0 (all rows jump together, no pads) is fastest;
    # lower values trade padding for fewer passes where a pass costs more than its tokens (GPU).
    jump_fill: float = 1.0
    autocast_dtype: torch.dtype | None = None
    stats: SearchStats = field(default_factory=SearchStats)

    @torch.no_grad()
    def search(self, prompts: list[list[int]]) -> list[list[Hypothesis]]:
        """The finished hypotheses of each prompt, best first (at most num_beams of them)."""
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        K = self.num_beams
        T = self.max_new_tokens or (self.trie.max_depth if self.trie is not None else None)
        if T is None:
            raise ValueError("unconstrained search needs max_new_tokens")
        B = len(prompts)
        results: list[list[Hypothesis]] = [[] for _ in range(B)]

        # --- prefill: the left-padded prompts once, then the cache is shared by each sample's K beams.
        width = max(len(p) for p in prompts)
        input_ids = torch.full((B, width), self.pad_token_id, dtype=torch.long, device=device)
        attention = torch.zeros((B, width), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            attention[i, width - len(p):] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        logits = self._forward(input_ids, attention, positions, cache, keep=1)
        cache.batch_repeat_interleave(K)
        attention = attention.repeat_interleave(K, dim=0)
        next_position = positions[:, -1].repeat_interleave(K) + 1
        # What was fed but not yet consumed, per cache row c: the model's log p of a pre-fed forced chain
        # (forced_lp[c, :chain_len[c]]) and the logits after the row's last fed token (last_logits[c]).
        last_logits = logits[:, -1].repeat_interleave(K, dim=0)
        forced_lp = torch.zeros((B * K, 0), device=device)
        chain_len = torch.zeros(B * K, dtype=torch.long, device=device)
        cache_rows = torch.arange(B * K, device=device)  # state row r lives in cache row cache_rows[r]
        consumed = torch.zeros(B * K, dtype=torch.long, device=device)  # queue entries state row r has used

        # --- per-sample state, (active samples, K, ...)
        sample_of = torch.arange(B, device=device)
        running = torch.full((B, K), NEG_INF, device=device)
        running[:, 0] = 0.0  # only the first beam is live at the start: the others would duplicate it
        run_tokens = torch.full((B, K, T), self.pad_token_id, dtype=torch.long, device=device)
        run_logps = torch.zeros((B, K, T), device=device)
        run_nodes = torch.full((B, K, T), -1, dtype=torch.long, device=device)
        node = torch.zeros((B, K), dtype=torch.long, device=device)
        fin_scores = torch.full((B, K), NEG_INF, device=device)
        fin_len = torch.zeros((B, K), dtype=torch.long, device=device)
        fin_tokens = run_tokens.clone()
        fin_logps = run_logps.clone()
        fin_nodes = run_nodes.clone()
        improvable = torch.ones(B, dtype=torch.bool, device=device)

        for t in range(T):
            needs = torch.isfinite(running).flatten() & (consumed > chain_len[cache_rows])
            if needs.any():
                # Bring the cache into state-row order and feed each row that needs logits the token it
                # chose last step plus, with jump-forward, the forced chain after it; others feed nothing.
                cache.reorder_cache(cache_rows)
                attention, next_position = attention[cache_rows], next_position[cache_rows]
                last_logits, forced_lp, chain_len = last_logits[cache_rows], forced_lp[cache_rows], chain_len[cache_rows]
                chain, lengths = self._forced_chains(node.flatten(), needs, T - t)
                lengths = self._affordable(lengths, needs, int(torch.isfinite(running).sum()))
                chain = chain[:, : int(lengths.max())]
                feed = torch.cat([run_tokens[:, :, t - 1].reshape(-1, 1), chain], dim=1)
                n = feed.shape[1]
                fed = needs[:, None] & (torch.arange(n, device=device)[None, :] <= lengths[:, None])
                feed = torch.where(fed, feed, self.pad_token_id)
                attention = torch.cat([attention, fed.long()], dim=1)
                positions = next_position[:, None] + torch.arange(n, device=device)
                next_position = next_position + fed.sum(dim=1)
                logits = self._forward(feed, attention, positions, cache, keep=n)
                rows_fed = torch.nonzero(needs).flatten()
                last_logits[rows_fed] = logits[rows_fed, lengths[rows_fed]].to(last_logits.dtype)
                if n > 1:
                    chain_lp = torch.log_softmax(logits[rows_fed, : n - 1].float(), dim=-1)
                    chain_lp = chain_lp.gather(2, chain[rows_fed][:, :, None])[:, :, 0]
                    width = max(forced_lp.shape[1], n - 1)
                    forced_lp = torch.nn.functional.pad(forced_lp, (0, width - forced_lp.shape[1]))
                    forced_lp[rows_fed] = torch.nn.functional.pad(chain_lp, (0, width - (n - 1)))
                chain_len[rows_fed] = lengths[rows_fed]
                consumed = torch.where(needs, 0, consumed)
                cache_rows = torch.arange(len(cache_rows), device=device)
            elif t > 0:
                self.stats.forward_calls_saved += 1  # every live beam's next log p was already computed
            from_chain = consumed < chain_len[cache_rows]  # this step's (forced) token was pre-fed
            log_probs = torch.log_softmax(last_logits[cache_rows].float(), dim=-1)
            if forced_lp.shape[1]:
                chained = forced_lp[cache_rows].gather(1, consumed.clamp(max=forced_lp.shape[1] - 1)[:, None])
            else:
                chained = log_probs.new_zeros((len(cache_rows), 1))
            self.stats.steps += 1
            A = running.shape[0]

            # --- candidate continuations: allowed children of each beam's node (or the vocabulary)
            if self.trie is not None:
                flat_node = node.flatten()
                count = torch.where(torch.isfinite(running).flatten(), self.trie.child_count[flat_node], 0)
                M = max(int(count.max()), 1)
                offset = torch.arange(M, device=device)
                allowed = offset[None, :] < count[:, None]
                child = torch.where(allowed, self.trie.child_start[flat_node][:, None] + offset, 0)
                cand_token = torch.where(allowed, self.trie.token[child], 0)
                # a pre-fed row has exactly one allowed token, in column 0
                model_lp = torch.where(from_chain[:, None], chained, log_probs.gather(1, cand_token))
                step = model_lp
                if self.alpha:
                    step = step * (1.0 - self.alpha * self.trie.ig_norm[child])
                step = torch.where(allowed, step, NEG_INF)
            else:
                M = log_probs.shape[1]
                child = torch.full((A * K, M), -1, dtype=torch.long, device=device)
                cand_token = torch.arange(M, device=device).expand(A * K, M)
                step = model_lp = log_probs
            scores = (running.reshape(-1, 1) + step).reshape(A, K * M)
            step_lp = model_lp.reshape(A, K * M)

            width2 = min(2 * K, K * M)
            top_scores, top_index = torch.topk(scores, width2, dim=1)
            if width2 < 2 * K:  # fewer continuations than 2K exist: the missing ones are -inf
                pad = 2 * K - width2
                top_scores = torch.cat([top_scores, top_scores.new_full((A, pad), NEG_INF)], dim=1)
                top_index = torch.cat([top_index, top_index[:, :1].expand(A, pad)], dim=1)
            top_beam = top_index // M
            top_token = cand_token.reshape(A, K * M).gather(1, top_index)
            top_node = child.reshape(A, K * M).gather(1, top_index)
            top_lp = step_lp.gather(1, top_index)
            finishes = top_token == self.eos_token_id
            if self.trie is None and t + 1 == T:
                finishes = torch.ones_like(finishes)  # max_new_tokens reached: every continuation stops

            def extend(history: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
                out = history.gather(1, top_beam[:, :, None].expand(-1, -1, T)).clone()
                out[:, :, t] = new
                return out

            cand_tokens, cand_logps, cand_nodes = extend(run_tokens, top_token), extend(run_logps, top_lp), extend(run_nodes, top_node)

            # --- the next live beams: the best K continuations that did not finish
            live_scores = torch.where(finishes, NEG_INF, top_scores)
            keep_scores, keep = torch.topk(live_scores, K, dim=1)
            running = keep_scores
            run_tokens = cand_tokens.gather(1, keep[:, :, None].expand(-1, -1, T))
            run_logps = cand_logps.gather(1, keep[:, :, None].expand(-1, -1, T))
            run_nodes = cand_nodes.gather(1, keep[:, :, None].expand(-1, -1, T))
            node = top_node.gather(1, keep).clamp(min=0)
            source_beam = top_beam.gather(1, keep)

            # --- finished hypotheses: EOS within the first K, while the sample can still improve
            new_fin = finishes & torch.isfinite(top_scores) & improvable[:, None]
            new_fin[:, K:] = False
            fin_candidates = torch.where(new_fin, top_scores / ((t + 1) ** self.length_penalty), NEG_INF)
            merged = torch.cat([fin_scores, fin_candidates], dim=1)
            fin_scores, pick = torch.topk(merged, K, dim=1)
            pick3 = pick[:, :, None].expand(-1, -1, T)
            fin_tokens = torch.cat([fin_tokens, cand_tokens], dim=1).gather(1, pick3)
            fin_logps = torch.cat([fin_logps, cand_logps], dim=1).gather(1, pick3)
            fin_nodes = torch.cat([fin_nodes, cand_nodes], dim=1).gather(1, pick3)
            fin_len = torch.cat([fin_len, fin_len.new_full((A, 2 * K), t + 1)], dim=1).gather(1, pick)

            # --- stopping rule (transformers' early_stopping=False heuristic)
            best_possible = running[:, 0] / ((t + 1) ** self.length_penalty)
            improvable = improvable & (best_possible > fin_scores.min(dim=1).values)
            done = ~improvable | ~torch.isfinite(running).any(dim=1) | (t + 1 == T)

            rows = (torch.arange(A, device=device)[:, None] * K + source_beam).flatten()
            if done.any():
                for a in torch.nonzero(done).flatten().tolist():
                    results[int(sample_of[a])] = self._collect(fin_scores[a], fin_len[a], fin_tokens[a], fin_logps[a], fin_nodes[a])
                stay = ~done
                if not stay.any():
                    break
                rows = rows.reshape(A, K)[stay].flatten()
                sample_of, running, node, improvable = sample_of[stay], running[stay], node[stay], improvable[stay]
                run_tokens, run_logps, run_nodes = run_tokens[stay], run_logps[stay], run_nodes[stay]
                fin_scores, fin_len = fin_scores[stay], fin_len[stay]
                fin_tokens, fin_logps, fin_nodes = fin_tokens[stay], fin_logps[stay], fin_nodes[stay]
            cache_rows = cache_rows[rows]
            consumed = (consumed + 1)[rows]
        return results

    def _forward(self, input_ids, attention, positions, cache, keep: int) -> torch.Tensor:
        self.stats.forward_calls += 1
        autocast = (
            torch.autocast(device_type=input_ids.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        with autocast:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                **kv_cache_kwargs(self.model, cache),
                use_cache=True,
                logits_to_keep=keep,
            )
        return out.logits[:, -keep:]

    def _forced_chains(self, nodes: torch.Tensor, rows: torch.Tensor, room: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row in `rows`: the tokens it is forced to write next (until its node branches or its
        next token is EOS), as a pad-filled matrix, and each row's chain length."""
        lengths = torch.zeros(len(nodes), dtype=torch.long, device=nodes.device)
        columns = []
        if self.jump_forward and self.trie is not None:
            active, current = rows.clone(), nodes.clone()
            for _ in range(room - 1):
                first_child = self.trie.child_start[current]
                active = active & (self.trie.child_count[current] == 1) & (self.trie.token[first_child] != self.eos_token_id)
                if not active.any():
                    break
                current = torch.where(active, first_child, current)
                columns.append(torch.where(active, self.trie.token[first_child], self.pad_token_id))
                lengths += active
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
    def _collect(scores, lengths, tokens, logps, nodes) -> list[Hypothesis]:
        out = []
        for k in range(len(scores)):
            score = float(scores[k])
            if not np.isfinite(score):
                continue
            n = int(lengths[k])
            out.append(
                Hypothesis(
                    tokens=tokens[k, :n].tolist(),
                    score=score,
                    step_logprobs=logps[k, :n].double().tolist(),
                    nodes=nodes[k, :n].tolist(),
                )
            )
        return out
