"""Stage `search-errors`: hit, search-error and model-error rates of a decode (docs/method.md §6.8).

Reads `<run>/decode/<name>/beams.parquet` and loads the decode's model, catalog and assistant as the decode
did (`decoding.Decoder.from_run` with the decode's own settings); writes `<run>/search-errors/<name>/`
(`per_sample.parquet`, schema `search_errors`, and the rates in stage.json's stats). `igdrec metrics` of a
rerank of that decode prints the rates.
"""

from __future__ import annotations

import dataclasses

from igdrec import decoding, options, schema
from igdrec import search_errors as S
from igdrec.config import DecodeConfig, SearchErrorsConfig
from igdrec.console import console, progress_bar
from igdrec.errors import IgdrecError
from igdrec.rundir import RunDir, StageWriter
from igdrec.runner import StagePlan, run_stage

PER_SAMPLE = "per_sample.parquet"
# The decode options whose effect on a step score the teacher-forced scorer reproduces (or that have none).
# A decode option outside this list is refused rather than silently ignored.
MODELLED_DECODE_OPTIONS = ("sft", "model", "split", "limit", "num_beams", "length_penalty", "alpha", "shard_size",
                           "cutoff_len", "constrained", "max_new_tokens", "tfa", "tfa_guidance")


def run(config: SearchErrorsConfig, run_dir: RunDir, force: bool = False) -> dict:
    return run_stage("search-errors", config, run_dir, force)


def decode_settings(decode: dict, where: str) -> DecodeConfig:
    """The DecodeConfig a decode ran with, from its manifest's cache-key parameters (those it omits kept their
    defaults, `options.key_params`); refuses a decode whose step scores the teacher-forced scorer cannot repeat."""
    params = {k: v for k, v in decode.get("params", {}).items() if k != "source"}
    unknown = sorted(set(params) - set(MODELLED_DECODE_OPTIONS))
    if unknown:
        raise IgdrecError(f"{where}: decode option {unknown[0]} = {params[unknown[0]]!r} changes step scores in a way "
                          "search-errors does not model; it cannot tell search errors of this decode")
    config = DecodeConfig(**params)
    if not config.constrained:
        raise IgdrecError(f"{where}: an unconstrained decode writes free text, not catalog items; search errors need a "
                          "constrained decode")
    return config


def plan(config: SearchErrorsConfig, run_dir: RunDir) -> StagePlan:
    run = run_dir
    name = run.resolve_name("decode", config.decode, "--decode")
    decode = run.require(f"decode/{name}", hint=f"igdrec decode --sft SFT --name {name}")
    decode_config = decode_settings(decode, str(run.stage_dir(f"decode/{name}") / "stage.json"))
    params = options.key_params(config) | {"decode": name}
    return StagePlan("search-errors", run, f"search-errors/{name}", config, params, {"decode": decode["fingerprint"]},
                     next=f"igdrec rerank --decode {name}, then igdrec metrics", product=PER_SAMPLE,
                     context={"decode_name": name, "decode_config": decode_config})


def compute(plan: StagePlan, out: StageWriter) -> None:
    run, name = plan.run, plan.context["decode_name"]
    decode_config = dataclasses.replace(plan.context["decode_config"], batch_size=plan.config.batch_size,
                                        device=plan.config.device)
    samples = schema.read(run.artifact("data", f"{decode_config.split}.parquet"), "samples").sort("sample_id")
    if decode_config.limit is not None:
        samples = samples.head(decode_config.limit)
    beams_path = run.artifact(f"decode/{name}", "beams.parquet")
    beams = schema.read(beams_path, "beams")
    decoder = decoding.Decoder.from_run(run, decode_config)
    assistant = None
    if decode_config.tfa is not None:
        assistant = decoding.TextFreeAssistant.load(run, decode_config.tfa, decoder.catalog.trie, decoder.device)
    with progress_bar() as progress:
        task = progress.add_task("search errors", total=None)
        frame, gap = S.diagnose(decoder, samples, beams, str(beams_path), assistant,
                                lambda done, total: progress.update(task, completed=done, total=total))
    schema.conform(frame, "search_errors").write_parquet(out.path(PER_SAMPLE))
    out.rows["per_sample"] = frame.height
    out.stats = {"decode": name, "split": decode_config.split, "n_samples": frame.height, "num_beams": decode_config.num_beams,
                 "alpha": decode_config.alpha, "length_penalty": decode_config.length_penalty,
                 "rates": S.rates(frame["class"].to_list()), "kth_score_gap_max": gap}


def report(plan: StagePlan, manifest: dict, cached: bool) -> None:
    console.print(S.rates_line(plan.context["decode_name"], manifest["stats"]), soft_wrap=True)
