"""Wall time per optimiser step of plain, Pos, CFT and IGD fine-tuning (not a test).

    .venv/bin/python bench/bench_sft_step.py [--run-dir runs/h3] [--reps 5] [--model smollm2-135m]
    .venv/bin/python bench/bench_sft_step.py --throughput [--lora-dropout 0] [--batch-size 16] [--threads 1]
    .venv/bin/python bench/bench_sft_step.py --dropout-cost [--threads 1]

`--throughput` compares instead the training step before and after the throughput work on the same
samples (plain weighting): "old" = micro-batches in data order, every prompt run in full and re-tokenised
every step; "new" = length-grouped micro-batches, the common prompt prefix computed once per micro-batch
(only where exact: no active dropout, so pass --lora-dropout 0 to see it), cached encodings, LoRA
dropout masks drawn as gaps between dropped elements (igdrec.dropout; only with dropout) and each LoRA
layer computed as one autograd function (igdrec.fused_lora) instead of peft's chain of modules. Steps
alternate old/new; it prints target tokens/s of both and the median of the paired ratios.

LoRA on the embedded model, micro-batch 4, effective batch 8 (two micro-batches per step), the same 8
samples every step: real prompts of <run-dir> when it holds a `data` stage (and zero-IG flags of its `ig`
stage), otherwise synthetic prompts of about 160 tokens with random zero-IG flags. The schemes are
interleaved within each repetition (order reversed every other one) so that load from other processes
hits them alike. Reported: the median and minimum wall and process-CPU time per step, the median of the
per-repetition ratios to plain (each scheme against the plain step of the same repetition), and the
floating-point operations of one step counted by torch's FlopCounterMode, a ratio that no other process
on a shared machine can disturb. Targets (paper Table 3): Pos, IGD ≤ 1.02×, CFT ≤ 2.1×.

`--dropout-cost` times one LoRA forward + backward of a micro-batch of 4 × 233 random tokens without
dropout, with LoRA dropout 0.05 drawn as geometric gaps (igdrec.dropout) and with nn.Dropout's one
Bernoulli draw per element, taking turns; it prints the fastest of --reps each.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch

from igdrec import training
from igdrec.config import SFTConfig
from igdrec.distributed import World
from igdrec.dropout import use_gap_dropout
from igdrec.flops import attention_shape, pass_cost
from igdrec.fused_lora import use_fused_lora
from igdrec.modeling import load_tokenizer
from igdrec.precision import resolve_precision
from igdrec.prompt import item_token_sequences
from igdrec.rundir import RunDir
from igdrec.sft_data import SFTExamples, micro_batch_rows
from igdrec.sft_loss import WeightedLoss
from igdrec.stages import sft

SCHEMES = {"plain": dict(weighting="plain"), "pos": dict(weighting="pos", beta=0.5), "cft": dict(weighting="cft", beta=0.5, cft_alpha=0.1), "igd": dict(weighting="igd", beta=0.1)}
WORDS = "star love night dark city blue king river last house game legend war dream man secret story heart".split()


def synthetic_examples(tokenizer, config: SFTConfig, n: int = 64) -> SFTExamples:
    rng = random.Random(0)
    titles = [" ".join(rng.choice(WORDS).title() for _ in range(rng.randint(1, 4))) + f" ({rng.randint(1950, 2020)})" for _ in range(200)]
    item_seqs = item_token_sequences(tokenizer, titles)
    targets = [rng.randrange(len(titles)) for _ in range(n)]
    histories = [[rng.randrange(len(titles)) for _ in range(10)] for _ in range(n)]
    flags = np.random.default_rng(0)
    zero_ig = [flags.random(len(item_seqs[t])) < 0.6 for t in targets]
    return SFTExamples(
        tokenizer, histories, targets, titles, item_seqs, "movies", config.weighting, config.beta, config.cutoff_len,
        zero_ig=zero_ig, with_reference=config.weighting == "cft",
    )


def real_examples(run: RunDir, tokenizer, config: SFTConfig) -> SFTExamples:
    from igdrec import schema

    titles = schema.read(run.artifact("data", "items.parquet"), "items").sort("item_id")["title"].to_list()
    category = run.require("data", hint="igdrec preprocess")["stats"]["category_word"]
    ig = sft.ig_index_usable(run, config, tokenizer)
    if ig is None and config.weighting == "igd":
        raise SystemExit(f"{run.root}: needs an ig stage built with {config.model}")
    return sft.split_examples(run, "train", 64, config, tokenizer, titles, item_token_sequences(tokenizer, titles), category, ig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--throughput", action="store_true", help="old vs new training step (see the docstring)")
    parser.add_argument("--dropout-cost", action="store_true", help="LoRA forward + backward by dropout kind (see the docstring)")
    parser.add_argument("--lora-dropout", type=float, default=SFTConfig.lora_dropout)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16-mixed | bf16 (the --throughput mode)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.throughput:
        throughput(args)
        return
    if args.dropout_cost:
        dropout_cost(args)
        return

    tokenizer = load_tokenizer(args.model)
    run = RunDir(args.run_dir) if args.run_dir else None
    use_real = run is not None and run.manifest("data") is not None
    configs = {k: SFTConfig(model=args.model, seed=0, **v) for k, v in SCHEMES.items()}
    data = {k: real_examples(run, tokenizer, c) if use_real else synthetic_examples(tokenizer, c) for k, c in configs.items()}
    rows = list(range(args.batch_size))
    micro = [rows[i:i + args.micro_batch_size] for i in range(0, len(rows), args.micro_batch_size)]
    sample_batch = data["plain"].collate(rows)
    prompt_tokens = int(sample_batch.attention_mask.sum()) / len(rows)
    target_tokens = int((sample_batch.weights > 0).sum()) / len(rows)
    print(f"data: {'real ' + str(run.root) if use_real else 'synthetic'}; {prompt_tokens:.0f} tokens per sample ({target_tokens:.1f} target), "
          f"micro-batch {args.micro_batch_size}, batch {args.batch_size}, LoRA r=8, {torch.get_num_threads()} threads")

    device = torch.device("cpu")
    model = sft.prepare_model(SFTConfig(model=args.model), device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    modules = {k: WeightedLoss(model, c.weighting, c.cft_alpha, c.share_prefix) for k, c in configs.items()}

    def step(scheme: str) -> tuple[float, float]:
        started, cpu_started = time.perf_counter(), time.process_time()
        batches = [data[scheme].collate(r) for r in micro]
        training.backward_effective_batch(modules[scheme], batches, World(), scaler)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started, time.process_time() - cpu_started

    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for scheme in SCHEMES:  # also the warm-up
        with FlopCounterMode(display=False) as counter:
            step(scheme)
        flops[scheme] = counter.get_total_flops()
    print("FLOPs per step: " + "  ".join(f"{k} {flops[k] / 1e12:.3f} T ({flops[k] / flops['plain']:.3f}×)" for k in SCHEMES), flush=True)
    wall, cpu = {k: [] for k in SCHEMES}, {k: [] for k in SCHEMES}
    for rep in range(args.reps):
        order = list(SCHEMES) if rep % 2 == 0 else list(reversed(SCHEMES))
        for scheme in order:
            w, c = step(scheme)
            wall[scheme].append(w)
            cpu[scheme].append(c)
        print(f"rep {rep + 1}/{args.reps}: " + "  ".join(f"{k} {wall[k][-1]:.2f}s (cpu {cpu[k][-1]:.2f}s)" for k in SCHEMES), flush=True)
    targets = {"plain": "", "pos": "≤ 1.02", "cft": "≤ 2.1", "igd": "≤ 1.02"}
    # the minimum is the step least disturbed by other processes; the median shows the typical one
    for label, times in (("wall", wall), ("cpu", cpu)):
        base_median, base_min = statistics.median(times["plain"]), min(times["plain"])
        print(f"\n{'scheme':8} {label + ' median s':>14} {'ratio':>7} {label + ' min s':>11} {'ratio':>7} {'paired ratio':>13} {'FLOP ratio':>11} {'target':>8}")
        for scheme in SCHEMES:
            median, fastest = statistics.median(times[scheme]), min(times[scheme])
            paired = statistics.median(t / b for t, b in zip(times[scheme], times["plain"]))
            print(f"{scheme:8} {median:14.3f} {median / base_median:7.3f} {fastest:11.3f} {fastest / base_min:7.3f} "
                  f"{paired:13.3f} {flops[scheme] / flops['plain']:11.3f} {targets[scheme]:>8}")


def throughput(args) -> None:
    tokenizer = load_tokenizer(args.model)
    run = RunDir(args.run_dir) if args.run_dir else None
    config = SFTConfig(model=args.model, seed=0, weighting="plain", lora_dropout=args.lora_dropout)
    data = real_examples(run, tokenizer, config) if run is not None and run.manifest("data") is not None else synthetic_examples(tokenizer, config)
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    model = sft.prepare_model(config, device, precision).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rows = list(range(args.batch_size))
    variants = {"old": dict(length_grouping=False, share_prefix=False), "new": dict(length_grouping=True, share_prefix=True)}
    modules = {k: WeightedLoss(model, "plain", 0.0, share_prefix=v["share_prefix"]) for k, v in variants.items()}
    target_tokens = sum(len(data.item_sequences[data.targets[i]]) for i in rows)

    def step(variant: str) -> tuple[float, float]:
        if variant == "old":
            data._encoded.clear()  # the old collate tokenised every sample on every step
        use_gap_dropout(model, enabled=variant == "new")  # the old LoRA dropout drew one Bernoulli number per element
        use_fused_lora(model, enabled=variant == "new")  # the old LoRA layer was peft's
        started, cpu_started = time.perf_counter(), time.process_time()
        micro = micro_batch_rows(data, rows, args.micro_batch_size, variants[variant]["length_grouping"])
        batches = [data.collate(r) for r in micro]
        training.backward_effective_batch(modules[variant], batches, World(), scaler, autocast=precision.autocast)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started, time.process_time() - cpu_started

    shape = attention_shape(model)
    computed = {k: sum(pass_cost(data.collate(r), modules[k].sharing(), shape)[0] for r in micro_batch_rows(data, rows, args.micro_batch_size, v["length_grouping"]))
                for k, v in variants.items()}
    padded = {k: sum(data.collate(r).input_ids.numel() for r in micro_batch_rows(data, rows, args.micro_batch_size, v["length_grouping"])) for k, v in variants.items()}
    shared = modules["new"].sharing()
    print(f"{len(rows)} samples, micro-batch {args.micro_batch_size}, LoRA dropout {args.lora_dropout} (prefix sharing {'on' if shared else 'off: dropout active'}), "
          f"precision {precision.name}, {torch.get_num_threads()} threads; {target_tokens} target tokens per step; tokens through the model "
          f"per step (padding included): old {padded['old']}, new {padded['new'] - computed['old'] + computed['new']}", flush=True)
    step("old"), step("new")  # warm-up
    wall, cpu = {k: [] for k in variants}, {k: [] for k in variants}
    for rep in range(args.reps):
        for variant in (("old", "new") if rep % 2 == 0 else ("new", "old")):
            w, c = step(variant)
            wall[variant].append(w)
            cpu[variant].append(c)
        print(f"rep {rep + 1}/{args.reps}: old {wall['old'][-1]:.2f}s (cpu {cpu['old'][-1]:.2f}s)  new {wall['new'][-1]:.2f}s (cpu {cpu['new'][-1]:.2f}s)", flush=True)
    # process CPU time is what a busy shared machine disturbs least (with one thread it is the step's work)
    for label, times in (("wall", wall), ("cpu", cpu)):
        for variant in variants:
            print(f"{label:4} {variant}: median {statistics.median(times[variant]):.2f} s/step = {target_tokens / statistics.median(times[variant]):.1f} target tokens/s")
        paired = statistics.median(o / n for o, n in zip(times["old"], times["new"]))
        print(f"{label:4} speed-up new/old (median of paired ratios): {paired:.3f}×")


def dropout_cost(args) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 40000, (4, 233))
    models = {p: sft.prepare_model(SFTConfig(model=args.model, seed=0, lora_dropout=p), torch.device("cpu")).train() for p in (0.0, 0.05)}
    kinds = {"no dropout": (0.0, True), "gap-drawn dropout 0.05": (0.05, True), "nn.Dropout 0.05": (0.05, False)}
    seconds = {kind: [] for kind in kinds}
    for rep in range(args.reps + 1):  # the first round warms up
        for kind, (p, gaps) in kinds.items():
            model = models[p]
            use_gap_dropout(model, enabled=gaps)
            started = time.perf_counter()
            model(input_ids=ids, logits_to_keep=12).logits.logsumexp(-1).sum().backward()
            if rep:
                seconds[kind].append(time.perf_counter() - started)
    base = min(seconds["no dropout"])
    print(f"LoRA forward + backward, 4 × 233 tokens, {torch.get_num_threads()} threads, fastest of {args.reps}:")
    for kind, times in seconds.items():
        print(f"  {kind:24} {min(times):6.2f} s  ({min(times) / base:.2f}× no dropout)")


if __name__ == "__main__":
    main()
