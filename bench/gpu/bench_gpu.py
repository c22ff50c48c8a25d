"""One GPU benchmark of igdrec's decoding and fine-tuning, sized for a single run of at most 8 minutes.

It needs no weights and no network: models are randomly initialised with the real shapes (the embedded
SmolLM2-135M, and a ~1.4B Llama: hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, the SmolLM2
vocabulary), and the prompts, catalog trie and IG values come from a prebuilt ml-100k run directory in
the payload (`bench/gpu/prepare.sh`). What it measures, on the same ml-100k test prompts:

  decode  igdrec's batched constrained beam search (10 beams, α 0.2, lp 0) at several batch sizes and at
          the automatic one, against the reference design (transformers `generate` with a per-beam Python
          trie processor, one prompt per call); top-10 agreement between the two checked in fp32;
  sft     a few optimiser steps of full fine-tuning (plain, IGD, CFT) of the 1.4B shape at effective
          batch 128 and of LoRA on the 135M shape: s/step, tokens/s and model-FLOPs utilisation against
          the card's measured bf16 matrix-product rate.

It prints one table and writes everything to OUT/gpu_bench.json. `--dry-run` runs every code path on
the CPU with a tiny model of the same vocabulary, a few prompts and one step each (minutes), which is
how it was checked on a machine without a GPU:

    python bench/gpu/bench_gpu.py --payload .gpu-payload --out /tmp/gpu-bench --dry-run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

from bench_catalog_scaling import StubModel, synthetic_titles  # noqa: E402
from reference_decoder import dict_trie, reference_generate  # noqa: E402

from igdrec import prompt, schema, training  # noqa: E402
from igdrec.beam import BeamSearch, TrieTensors  # noqa: E402
from igdrec.config import DecodeConfig  # noqa: E402
from igdrec.distributed import World  # noqa: E402
from igdrec.ig import CatalogTrie, build_catalog_trie  # noqa: E402
from igdrec.modeling import load_tokenizer  # noqa: E402
from igdrec.rundir import RunDir  # noqa: E402
from igdrec.sft_data import SFTExamples, micro_batch_rows  # noqa: E402
from igdrec.sft_loss import WeightedLoss  # noqa: E402

SHAPES = {
    "135m": {},  # the payload's SmolLM2 config as it is
    "1.4b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, head_dim=128, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, head_dim=16),
}


@dataclass
class Report:
    device: str
    versions: dict
    matmul_tflops: float | None = None
    decode: list = field(default_factory=list)
    agreement: list = field(default_factory=list)
    reads: list = field(default_factory=list)
    catalog: list = field(default_factory=list)
    sft: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - started, result


def measured_matmul_tflops(device: torch.device) -> float | None:
    """The card's bf16 matrix-product rate on random data (the MFU denominator), median of 10 after warm-up."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        seconds, _ = timed(lambda: a @ b, device)
        times.append(seconds)
    return 2 * 8192**3 / float(np.median(times)) / 1e12


def model_config(payload: Path, shape: str):
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(payload / "smollm2-135m")
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    return config


def random_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0, peak: float = 20.0):
    """A randomly initialised causal LM. The embeddings are scaled up so that next-token distributions
    are peaked: at plain initialisation they are nearly uniform and beam order would hang on float noise."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(peak)
    return model.eval()


def ml100k_prompts(run: RunDir, tokenizer, n: int) -> list[list[int]]:
    items = schema.read(run.artifact("data", "items.parquet"), "items")
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list()))
    category = run.require("data", hint="bench/gpu/prepare.sh")["stats"]["category_word"]
    test = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id").head(n)
    return [prompt.encode_prompt(tokenizer, [titles[i] for i in h], category, 512)[0] for h in test["history_item_ids"].to_list()]


def beam_search(model, tokenizer, trie_tensors, **overrides) -> BeamSearch:
    # self_check: the KV-cache check also proves the cache keyword works with the box's transformers;
    # static shapes: what `decode` takes on CUDA
    settings = dict(num_beams=10, length_penalty=0.0, alpha=0.2, trie=trie_tensors, jump_forward=True, share_prefix=True,
                    self_check=True, static_shapes=True)
    return BeamSearch.from_config(model, tokenizer.eos_token_id, tokenizer.pad_token_id, DecodeConfig(), **(settings | overrides))


# Tensor methods that make the host wait for the device's value (as tests/unit/test_beam_static.py counts them).
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


def count_reads(search: BeamSearch, prompts: list[list[int]], device) -> dict:
    """One search of `prompts` (one batch) with every blocking read counted: the tensor methods above, by
    whose code calls them (igdrec's or the model's), and on CUDA every synchronisation the sync-debug mode
    reports (implicit ones too: boolean-mask indexing, copies to the host)."""
    import warnings

    import igdrec

    package = igdrec.__path__[0]
    counts = {"igdrec": 0, "model": 0}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(method):
        def read(*args, **kwargs):
            counts["igdrec" if sys._getframe(1).f_code.co_filename.startswith(package) else "model"] += 1
            return method(*args, **kwargs)
        return read

    search.search(prompts)  # the first search encodes the prompts' shared prefix
    steps = search.stats.steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        for name, method in originals.items():
            setattr(torch.Tensor, name, counting(method))
        try:
            search.search(prompts)
        finally:
            for name, method in originals.items():
                setattr(torch.Tensor, name, method)
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught) if device.type == "cuda" else None
    return {"igdrec_reads": counts["igdrec"], "model_reads": counts["model"], "cuda_syncs": syncs, "steps": search.stats.steps - steps}


def decode_in_batches(search: BeamSearch, prompts: list[list[int]], batch_size: int) -> list:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # as the decode stage batches them
    out: list = [None] * len(prompts)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin:begin + batch_size]
        for i, hyps in zip(chunk, search.search([prompts[i] for i in chunk])):
            out[i] = hyps
    return out


def auto_batch_size(model, prompts, trie, device) -> int | None:
    """The batch `decode --batch-size auto` picks on this device (None on a CPU, where auto means 8)."""
    from igdrec.decoding import auto_batch_size as pick

    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    dtype_bytes = next(model.parameters()).element_size()
    width = int(trie.child_count.max())  # decode takes static shapes on CUDA: candidates as wide as the widest node
    return pick(model.config, 10, max(len(p) for p in prompts), trie.max_depth, dtype_bytes, free, width)


def bench_decode(report: Report, shape: str, args, tokenizer, trie, prompts, device) -> None:
    config = model_config(args.payload, shape)
    root = dict_trie(trie)
    tensors = TrieTensors.from_trie(trie, device)
    common = dict(num_beams=10, length_penalty=0.0, alpha=0.2, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, max_new_tokens=trie.max_depth, root=root)

    # Agreement in fp32: the same lists as the reference design.
    model = random_model(config, device, torch.float32)
    checked = prompts[: args.agreement_prompts]
    reference = [reference_generate(model, [p], **common)[0] for p in checked]
    for static in (True, False):
        ours = decode_in_batches(beam_search(model, tokenizer, tensors, static_shapes=static), checked, 8)
        same = sum([h.tokens for h in o] == [t for t, _ in r] for o, r in zip(ours, reference))
        report.agreement.append({"shape": shape, "shapes": "static" if static else "dynamic", "dtype": "fp32",
                                 "prompts": len(checked), "same_top10": same})
    del model

    # Timing in the compute dtype igdrec decodes in (bf16 weights on CUDA, fp32 on CPU).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(config, device, dtype)
    search = beam_search(model, tokenizer, tensors)
    dynamic = beam_search(model, tokenizer, tensors, static_shapes=False)
    decode_in_batches(search, prompts[:4], 4)  # warm-up: kernels, allocator
    decode_in_batches(dynamic, prompts[:4], 4)
    for label, engine in (("static", search), ("dynamic", dynamic)):
        for size in (1, 8):
            row = count_reads(engine, prompts[:size], device)
            report.reads.append({"shape": shape, "shapes": label, "batch": size} | row)
            print(f"reads {shape:5} {label:7} batch {size}: {row}", flush=True)
    reference_n = args.reference_prompts
    seconds, _ = timed(lambda: [reference_generate(model, [p], **common) for p in prompts[:reference_n]], device)
    reference_ms = 1000 * seconds / reference_n
    report.decode.append({"shape": shape, "decoder": "reference design", "batch": 1, "prompts": reference_n, "ms_per_sample": reference_ms, "speedup": 1.0})
    sizes = list(args.batch_sizes)
    auto = auto_batch_size(model, prompts, trie, device)
    if auto is not None:
        sizes.append(auto)
    else:
        report.notes.append("CPU: the automatic batch is 8 there; not measured separately")
    for size in sizes:
        n = min(len(prompts), max(2 * size, args.min_timed_prompts))
        if time.perf_counter() - args.started > args.budget_s:
            report.notes.append(f"decode {shape} batch {size}: skipped, time budget spent")
            continue
        try:
            seconds, _ = timed(lambda: decode_in_batches(search, prompts[:n], size), device)
        except torch.OutOfMemoryError:
            report.notes.append(f"decode {shape} batch {size}: out of memory")
            torch.cuda.empty_cache()
            continue
        ms = 1000 * seconds / n
        label = "igdrec (auto batch)" if auto is not None and size == auto and size == sizes[-1] else "igdrec"
        report.decode.append({"shape": shape, "decoder": label, "batch": size, "prompts": n, "ms_per_sample": ms, "speedup": reference_ms / ms})
        print(f"decode {shape:5} batch {size:4}: {ms:8.2f} ms/sample ({reference_ms / ms:6.1f}x the reference design)", flush=True)
        if size in (1, sizes[-1]):  # batch-1 latency and the largest batch, with the shapes a CPU decode takes
            seconds, _ = timed(lambda: decode_in_batches(dynamic, prompts[:n], size), device)
            ms = 1000 * seconds / n
            report.decode.append({"shape": shape, "decoder": "igdrec dynamic shapes", "batch": size, "prompts": n,
                                  "ms_per_sample": ms, "speedup": reference_ms / ms})
            print(f"decode {shape:5} batch {size:4}: {ms:8.2f} ms/sample with dynamic shapes", flush=True)
    if shape == args.compile_shape and time.perf_counter() - args.started <= args.budget_s:
        # --compile: static shapes through torch.compile (the compilation is paid in the warm-up, not timed)
        try:
            compiled = beam_search(model, tokenizer, tensors, compile_backend=args.compile_backend)
            decode_in_batches(compiled, prompts[:2], 1)
            n = min(len(prompts), args.min_timed_prompts)
            seconds, _ = timed(lambda: decode_in_batches(compiled, prompts[:n], 1), device)
            ms = 1000 * seconds / n
            report.decode.append({"shape": shape, "decoder": f"igdrec --compile ({args.compile_backend})", "batch": 1,
                                  "prompts": n, "ms_per_sample": ms, "speedup": reference_ms / ms})
            print(f"decode {shape:5} batch    1: {ms:8.2f} ms/sample compiled", flush=True)
        except Exception as exc:  # noqa: BLE001 - a failed compilation is a result to report, not a reason to stop
            report.notes.append(f"decode {shape} --compile: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}")
    del model, search, dynamic
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_catalog(report: Report, shape: str, args, tokenizer, run, prompts_histories, device) -> None:
    """Synthetic catalogs (ml-100k title words recombined, bench/bench_catalog_scaling.py) of each size in
    `args.catalog_sizes`: ms/sample at batch 1 and at the largest batch, the trie tensors' size, and the
    search's share of a step (the same search with a stub model of no cost, per step, over the model's)."""
    histories, category = prompts_histories
    items = schema.read(run.artifact("data", "items.parquet"), "items").sort("item_id")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(model_config(args.payload, shape), device, dtype)
    for size in args.catalog_sizes:
        if time.perf_counter() - args.started > args.budget_s:
            report.notes.append(f"catalog {size}: skipped, time budget spent")
            continue
        titles = synthetic_titles(items["title"].to_list(), size, seed=size)
        counts = np.random.default_rng(size).zipf(1.3, size=size).astype(float)
        trie = build_catalog_trie(np.arange(size), prompt.item_token_sequences(tokenizer, titles), counts)
        tensors = TrieTensors.from_trie(trie, device)
        prompts = [prompt.encode_prompt(tokenizer, [titles[i % size] for i in h], category, 512)[0] for h in histories]
        batch = args.batch_sizes[-1]
        for size_batch in (1, batch):
            n = min(len(prompts), max(2 * size_batch, args.min_timed_prompts))
            search = beam_search(model, tokenizer, tensors, self_check=False)
            decode_in_batches(search, prompts[:2], 2)
            search.stats = type(search.stats)()
            seconds, _ = timed(lambda: decode_in_batches(search, prompts[:n], size_batch), device)
            steps = search.stats.steps
            stub = beam_search(StubModel(len(tokenizer), max(size_batch, 2) * 10).to(device), tokenizer, tensors, self_check=False)
            stub.model.logits = stub.model.logits.to(device)
            decode_in_batches(stub, prompts[:2], 2)
            stub.stats = type(stub.stats)()
            stub_seconds, _ = timed(lambda: decode_in_batches(stub, prompts[:n], size_batch), device)
            share = (stub_seconds / stub.stats.steps) / (seconds / steps)
            row = {"shape": shape, "titles": size, "trie_nodes": trie.num_nodes, "trie_mb": tensors.nbytes() / 2**20,
                   "batch": size_batch, "prompts": n, "ms_per_sample": 1000 * seconds / n,
                   "search_ms_per_step": 1000 * stub_seconds / stub.stats.steps, "search_share": share}
            report.catalog.append(row)
            print(f"catalog {size:6} {shape} batch {size_batch:4}: {row['ms_per_sample']:8.2f} ms/sample, search "
                  f"{row['search_ms_per_step']:.2f} ms/step ({100 * share:.1f}% of a step)", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sft_examples(run: RunDir, tokenizer, scheme: str, n: int) -> SFTExamples:
    items = schema.read(run.artifact("data", "items.parquet"), "items").sort("item_id")
    titles = items["title"].to_list()
    train = schema.read(run.artifact("data", "train.parquet"), "samples").sort("sample_id").head(n)
    flags = schema.read(run.artifact("ig", "sample_ig_train.parquet"), "sample_ig").sort("sample_id").head(n)
    category = run.require("data", hint="bench/gpu/prepare.sh")["stats"]["category_word"]
    return SFTExamples(
        tokenizer, train["history_item_ids"].to_list(), train["item_id"].to_list(), titles,
        prompt.item_token_sequences(tokenizer, titles), category, scheme, 0.5 if scheme == "cft" else 0.1, 512,
        zero_ig=[np.asarray(f, dtype=bool) for f in flags["zero_ig"].to_list()], with_reference=scheme == "cft",
    )


def bench_sft(report: Report, shape: str, args, tokenizer, run, device, lora: bool) -> None:
    config = model_config(args.payload, shape)
    model = random_model(config, device, torch.float32, peak=1.0)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    schemes = ("plain", "igd", "cft") if not lora else ("plain", "igd")
    batch, micro = args.sft_batch, args.sft_micro_batch
    plain_seconds = None
    for scheme in schemes:
        if time.perf_counter() - args.started > args.budget_s:
            report.notes.append(f"sft {shape} {scheme}: skipped, time budget spent")
            continue
        data = sft_examples(run, tokenizer, scheme, batch * (args.sft_steps + 1))
        module = WeightedLoss(model, scheme, 0.1 if scheme == "cft" else 0.0, share_prefix=True)

        def step(index: int) -> int:
            rows = list(range(index * batch, (index + 1) * batch))
            micro_batches = [data.collate(r).to(device) for r in micro_batch_rows(data, rows, micro, length_grouping=True)]
            training.backward_effective_batch(module, micro_batches, World(), scaler)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return sum(int(b.attention_mask.sum()) + (int(b.ref_attention_mask.sum()) if b.ref_attention_mask is not None else 0) for b in micro_batches)

        try:
            step(0)  # warm-up
            seconds, tokens = timed(lambda: sum(step(i + 1) for i in range(args.sft_steps)), device)
        except torch.OutOfMemoryError:
            report.notes.append(f"sft {shape} {scheme}: out of memory at micro-batch {micro}")
            torch.cuda.empty_cache()
            continue
        per_step = seconds / args.sft_steps
        plain_seconds = per_step if scheme == "plain" else plain_seconds
        tokens_per_s = tokens / seconds
        # Training FLOPs ≈ 6·N per token (forward 2N, backward 4N), LoRA included as the full model's
        # forward and backward through the activations.
        flops = 6 * n_params * tokens_per_s
        mfu = flops / (report.matmul_tflops * 1e12) if report.matmul_tflops else None
        row = {"shape": shape, "mode": "lora" if lora else "full", "scheme": scheme, "batch": batch, "micro_batch": micro,
               "s_per_step": per_step, "vs_plain": per_step / plain_seconds if plain_seconds else None,
               "tokens_per_s": tokens_per_s, "mfu": mfu}
        report.sft.append(row)
        print(f"sft {shape:5} {row['mode']:4} {scheme:5}: {per_step:7.3f} s/step, {tokens_per_s:9.0f} tokens/s"
              + (f", MFU {100 * mfu:.1f}%" if mfu else ""), flush=True)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_table(report: Report) -> None:
    print(f"\n# igdrec GPU benchmark — {report.device}; " + ", ".join(f"{k} {v}" for k, v in report.versions.items()))
    if report.matmul_tflops:
        print(f"measured bf16 matmul rate: {report.matmul_tflops:.0f} TFLOP/s")
    print("\n| decode | batch | ms/sample | speed-up vs reference design |\n|---|---:|---:|---:|")
    for r in report.decode:
        print(f"| {r['shape']} {r['decoder']} | {r['batch']} | {r['ms_per_sample']:.2f} | {r['speedup']:.1f}× |")
    print("\n| agreement (fp32) | same top-10 lists |\n|---|---:|")
    for r in report.agreement:
        print(f"| {r['shape']} {r['shapes']} shapes | {r['same_top10']}/{r['prompts']} |")
    print("\n| blocking reads per search (one batch) | batch | steps | igdrec | the model's | CUDA syncs (sync-debug) |\n|---|---:|---:|---:|---:|---:|")
    for r in report.reads:
        print(f"| {r['shape']} {r['shapes']} shapes | {r['batch']} | {r['steps']} | {r['igdrec_reads']} | {r['model_reads']} | "
              f"{'–' if r['cuda_syncs'] is None else r['cuda_syncs']} |")
    print("\n| synthetic catalog | titles | trie nodes | trie MB | batch | ms/sample | search ms/step | search share |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in report.catalog:
        print(f"| {r['shape']} | {r['titles']:,} | {r['trie_nodes']:,} | {r['trie_mb']:.2f} | {r['batch']} | {r['ms_per_sample']:.2f} | "
              f"{r['search_ms_per_step']:.3f} | {100 * r['search_share']:.1f}% |")
    print("\n| sft | s/step | × plain | tokens/s | MFU |\n|---|---:|---:|---:|---:|")
    for r in report.sft:
        ratio = f"{r['vs_plain']:.2f}" if r["vs_plain"] else "–"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "–"
        print(f"| {r['shape']} {r['mode']} {r['scheme']} (batch {r['batch']}, micro {r['micro_batch']}) | {r['s_per_step']:.3f} | {ratio} | {r['tokens_per_s']:.0f} | {mfu} |")
    for note in report.notes:
        print(f"note: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--payload", type=Path, default=ROOT / ".gpu-payload")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, few prompts: checks every code path.")
    parser.add_argument("--budget-s", type=float, default=420.0, help="Skip remaining measurements after this many seconds.")
    args = parser.parse_args()
    args.started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.dry_run:
        shapes, sft_shapes = ["tiny"], [("tiny", False), ("tiny", True)]
        args.batch_sizes, args.min_timed_prompts, args.reference_prompts, args.agreement_prompts = [1, 4], 4, 2, 4
        args.sft_batch, args.sft_micro_batch, args.sft_steps, n_prompts = 4, 2, 1, 8
        args.catalog_sizes = [200, 1000]
        args.compile_shape, args.compile_backend = "tiny", "eager"  # inductor needs a compiler; eager checks the tracing
    else:
        if device.type != "cuda":
            raise SystemExit("no CUDA device: use --dry-run to check the script on a CPU")
        shapes, sft_shapes = ["135m", "1.4b"], [("1.4b", False), ("135m", True)]
        args.batch_sizes, args.min_timed_prompts, args.reference_prompts, args.agreement_prompts = [1, 16, 64, 256], 32, 8, 8
        args.sft_batch, args.sft_micro_batch, args.sft_steps, n_prompts = 128, 16, 2, 512
        args.catalog_sizes = [1000, 41722]  # 41,722: the paper's Books catalog
        args.compile_shape, args.compile_backend = "135m", "inductor"
    import transformers

    report = Report(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    versions={"torch": torch.__version__, "transformers": transformers.__version__})
    report.matmul_tflops = measured_matmul_tflops(device)
    run = RunDir(args.payload / "run")
    tokenizer = load_tokenizer(str(args.payload / "smollm2-135m"))
    trie = CatalogTrie.load(run.artifact("ig", "trie_nodes.parquet"), run.artifact("ig", "item_paths.parquet"))
    prompts = ml100k_prompts(run, tokenizer, n_prompts)
    print(f"{len(prompts)} ml-100k test prompts, mean {np.mean([len(p) for p in prompts]):.0f} tokens; catalog {len(trie.item_ids)} items; device {report.device}", flush=True)
    histories = schema.read(run.artifact("data", "test.parquet"), "samples").sort("sample_id").head(n_prompts)["history_item_ids"].to_list()
    for shape in shapes:
        bench_decode(report, shape, args, tokenizer, trie, prompts, device)
        if shape == shapes[0]:
            bench_catalog(report, shape, args, tokenizer, run, (histories, run.require("data", hint="bench/gpu/prepare.sh")["stats"]["category_word"]), device)
    for shape, lora in sft_shapes:
        bench_sft(report, shape, args, tokenizer, run, device, lora)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    print_table(report)
    print(f"\nwall time {time.perf_counter() - args.started:.0f} s; JSON in {args.out / 'gpu_bench.json'}")


if __name__ == "__main__":
    main()
