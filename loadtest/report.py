"""Load-test report: per-run summaries, /metrics deltas, speedup, markdown + JSON.

Contract: everything here is a pure function of recorded data.
- `summarize_run(records)`: client-side figures of one Locust run (one mode, one
  concurrency) from its RequestRecords.
- `spec_decode_delta(before, after)`: server-side speculative-decoding figures from two
  /metrics scrapes taken around the run (parsed with `parse_metrics`).
- `build_report(config, runs)` -> the JSON report; `render_markdown(report)` -> text.

Definitions:
- output tokens/s: every output token received during the run (including tokens of
  requests that Locust cut off when the run time elapsed) / the run's window, from
  the first request sent to the last byte received. With N users this is the server's
  aggregate decode throughput at concurrency N.
- request tokens/s: output tokens / end-to-end time of each completed request.
- TTFT, ITL: see loadtest/stream.py. Percentiles: dflash_core.stats.percentile (linear
  interpolation, as in every benchmark of the project).
- acceptance length (server): 1 + accepted draft tokens / drafts, from the counter
  deltas; a draft is one verify of one request's block, so this is the mean number of
  tokens emitted per target forward (the paper's tau). Prefill tokens are not counted.
"""
from __future__ import annotations

import math

import numpy as np

from dflash_core.stats import on_off, percentile  # noqa: F401  (percentile re-exported for the report tests)
from loadtest.stream import RequestRecord

# Counter names of the service's /metrics (service/metrics.py); the sample names carry
# prometheus_client's "_total" suffix.
DRAFTS = "dflash_spec_decode_num_drafts_total"
DRAFT_TOKENS = "dflash_spec_decode_num_draft_tokens_total"
ACCEPTED = "dflash_spec_decode_num_accepted_tokens_total"
ACCEPTED_PER_POS = "dflash_spec_decode_num_accepted_tokens_per_pos_total"


def summarize_run(records: list[RequestRecord]) -> dict:
    """Client-side summary of one run. Times in ms, rates per second."""
    completed = [r for r in records if r.complete]
    failed = [r for r in records if r.error]
    cut_off = [r for r in records if not r.complete and not r.error]
    ok = [r for r in records if not r.error]
    # 1) throughput over the run's window
    starts = [r.start_s for r in records]
    ends = [r.start_s + (r.e2e_s or 0.0) for r in records]
    window_s = (max(ends) - min(starts)) if records else 0.0
    output_tokens = sum(r.output_tokens for r in ok)
    # 2) latencies
    ttft_ms = [r.ttft_s * 1000.0 for r in ok if r.ttft_s is not None]
    itl_ms = [s * 1000.0 for r in ok for s in r.itl_samples_s()]
    req_tps = [r.tokens_per_s for r in completed if r.tokens_per_s is not None]
    e2e_ms = [r.e2e_s * 1000.0 for r in completed if r.e2e_s is not None]
    return {
        "requests_completed": len(completed),
        "requests_failed": len(failed),
        "requests_cut_off": len(cut_off),
        "errors": sorted({r.error for r in failed})[:5],
        "window_s": window_s,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / window_s if window_s > 0 else None,
        "requests_per_s": len(completed) / window_s if window_s > 0 else None,
        "request_tokens_per_s_p50": percentile(req_tps, 50),
        "ttft_ms_p50": percentile(ttft_ms, 50),
        "ttft_ms_p95": percentile(ttft_ms, 95),
        "itl_ms_p50": percentile(itl_ms, 50),
        "itl_ms_p95": percentile(itl_ms, 95),
        "itl_ms_mean": float(np.mean(itl_ms)) if itl_ms else None,
        "e2e_ms_p50": percentile(e2e_ms, 50),
        "mean_output_tokens": (sum(r.output_tokens for r in completed) / len(completed)) if completed else None,
    }


# --------------------------------------------------------------------------- /metrics

def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text exposition -> {(sample name, sorted label pairs): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when absent)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def spec_decode_delta(before: dict, after: dict) -> dict:
    """Server-side speculative-decoding figures between two scrapes."""
    def d(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    drafts, draft_tokens, accepted = d(DRAFTS), d(DRAFT_TOKENS), d(ACCEPTED)
    positions = sorted({int(dict(lab)["position"]) for (n, lab) in after
                        if n == ACCEPTED_PER_POS and "position" in dict(lab)})
    per_pos = [d(ACCEPTED_PER_POS, position=str(p)) for p in positions]
    return {
        "num_drafts": drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        # tau: tokens per target forward = the accepted draft tokens + the bonus token
        "acceptance_length": (1.0 + accepted / drafts) if drafts > 0 else None,
        "draft_acceptance_rate": (accepted / draft_tokens) if draft_tokens > 0 else None,
        # share of drafts whose position k was accepted (k = 0 .. B-2)
        "acceptance_rate_per_position": [x / drafts for x in per_pos] if drafts > 0 else [],
    }


# --------------------------------------------------------------------------- report

def outputs_by_prompt(records: list[RequestRecord]) -> dict[int, list[int]]:
    """Output token ids of the first completed request of each prompt (needs token ids)."""
    out: dict[int, list[int]] = {}
    for r in records:
        if r.complete and r.token_ids and r.prompt_index not in out:
            out[r.prompt_index] = list(r.token_ids)
    return out


def compare_outputs(a: dict[int, list[int]], b: dict[int, list[int]]) -> dict:
    """How many prompts completed in both runs produced the same tokens (greedy: all)."""
    common = sorted(set(a) & set(b))
    return {"compared": len(common), "identical": sum(a[i] == b[i] for i in common)}


def build_report(config: dict, runs: list[dict]) -> dict:
    """runs: [{"concurrency", "mode", optionally "rep" (1 when absent), "client": summarize_run(...),
    "server": spec_decode_delta(...), optionally "outputs": outputs_by_prompt(...)}].

    Adds one speedup row per concurrency that has both modes:
    speedup = output tokens/s with speculation on / off (same prompts, same concurrency); with
    several reps of a mode, each figure is the median over its reps, and `rep_speedups` lists
    each rep's own ratio. Where token ids were recorded, `same_output` counts the prompts that
    gave identical outputs on and off, over every rep that ran both (speculative decoding is
    lossless: with greedy decoding every one should match).
    The per-prompt outputs are not kept in the report."""
    outputs = {(r["concurrency"], r["mode"], r.get("rep", 1)): r.get("outputs") for r in runs}
    runs = [{k: v for k, v in r.items() if k != "outputs"} for r in runs]
    by_key: dict[tuple[int, str], dict[int, dict]] = {}
    for r in runs:
        by_key.setdefault((r["concurrency"], r["mode"]), {})[r.get("rep", 1)] = r
    speedup = []
    for c in sorted({r["concurrency"] for r in runs}):
        on, off = by_key.get((c, "on")), by_key.get((c, "off"))
        if not on or not off:
            continue

        def by_rep(mode_runs, field):   # {rep: the field} where the run has it
            return {k: x["client"][field] for k, x in mode_runs.items() if x["client"][field] is not None}

        def med(mode_runs, field):
            return percentile(by_rep(mode_runs, field).values(), 50)
        tps = on_off(by_rep(on, "output_tokens_per_s"), by_rep(off, "output_tokens_per_s"))
        both = sorted(set(on) & set(off))
        same = [compare_outputs(outputs[(c, "on", k)], outputs[(c, "off", k)]) for k in both
                if outputs[(c, "on", k)] is not None and outputs[(c, "off", k)] is not None]
        speedup.append({
            "concurrency": c,
            "output_tokens_per_s_on": tps["median_on"],
            "output_tokens_per_s_off": tps["median_off"],
            "speedup": tps["ratio"],
            "rep_speedups": tps["rep_ratios"],
            "itl_ms_p50_on": med(on, "itl_ms_p50"),
            "itl_ms_p50_off": med(off, "itl_ms_p50"),
            "ttft_ms_p50_on": med(on, "ttft_ms_p50"),
            "ttft_ms_p50_off": med(off, "ttft_ms_p50"),
            "acceptance_length_on": percentile([a for a in ((x.get("server") or {}).get("acceptance_length")
                                                            for x in on.values()) if a is not None], 50),
            "same_output": {"compared": sum(x["compared"] for x in same),
                            "identical": sum(x["identical"] for x in same)} if same else None,
        })
    return {"config": config, "runs": runs, "speedup": speedup}


def _f(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def render_markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "### Load test: speculation on vs off",
        "",
        f"- command: `{cfg.get('command', '')}`",
        f"- server: {cfg.get('host')} model `{cfg.get('model')}`, api {cfg.get('api')}, "
        f"max_tokens {cfg.get('max_tokens')}, temperature {cfg.get('temperature')}, "
        f"{cfg.get('duration')} per run",
        f"- prompts: {cfg.get('num_prompts')} from {cfg.get('prompt_source')} (same order in every run)",
    ]
    if cfg.get("cpu_count") is not None:
        lines.append(f"- client machine: {cfg['cpu_count']} CPUs, 1-min load average "
                     f"{cfg.get('loadavg_1m_start')} at start, {cfg.get('loadavg_1m_end')} at end")
    lines += [
        "",
        "| concurrency | speculation | completed (cut off, failed) | output tok/s | request tok/s p50 "
        "| TTFT p50 / p95 ms | ITL p50 / p95 ms | acceptance length |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        c, s = r["client"], r.get("server") or {}
        rep = f" (rep {r.get('rep', 1)})" if (cfg.get("reps") or 1) > 1 else ""
        lines.append(
            f"| {r['concurrency']} | {r['mode']}{rep} | {c['requests_completed']} ({c['requests_cut_off']}, "
            f"{c['requests_failed']}) | {_f(c['output_tokens_per_s'])} | {_f(c['request_tokens_per_s_p50'])} "
            f"| {_f(c['ttft_ms_p50'], 0)} / {_f(c['ttft_ms_p95'], 0)} "
            f"| {_f(c['itl_ms_p50'], 0)} / {_f(c['itl_ms_p95'], 0)} | {_f(s.get('acceptance_length'), 2)} |")
    if report["speedup"]:
        reps = (cfg.get("reps") or 1) > 1
        lines += ["", "| concurrency | output tok/s on | output tok/s off | speedup (on/off) "
                      + ("| per rep " if reps else "") + "| same output on/off |",
                  "|---:|---:|---:|---:|" + ("---|" if reps else "") + "---:|"]
        for row in report["speedup"]:
            same = row.get("same_output")
            same_s = f"{same['identical']}/{same['compared']}" if same else "-"
            per_rep = (" | " + ", ".join(f"{x:.2f}" for x in row.get("rep_speedups") or [])) if reps else ""
            lines.append(f"| {row['concurrency']} | {_f(row['output_tokens_per_s_on'])} "
                         f"| {_f(row['output_tokens_per_s_off'])} | {_f(row['speedup'], 2)}x{per_rep} | {same_s} |")
        if reps:
            lines += ["", f"Each mode ran {cfg['reps']} times per concurrency, the order reversed in every second "
                          "rep; this table's tokens/s are the medians over the reps, `per rep` each rep's own "
                          "on/off ratio."]
    tag = (lambda r: f"{r['concurrency']}, rep {r.get('rep', 1)}") if (cfg.get("reps") or 1) > 1 \
        else (lambda r: r["concurrency"])
    per_pos = [(tag(r), (r.get("server") or {}).get("acceptance_rate_per_position") or [])
               for r in report["runs"] if r["mode"] == "on"]
    per_pos = [(c, rates) for c, rates in per_pos if rates]
    if per_pos:
        lines += ["", "Share of drafts accepted at draft position k = 0, 1, ... (server counters):", ""]
        for c, rates in per_pos:
            lines.append(f"- concurrency {c}: " + " ".join(f"{x:.2f}" for x in rates))
    idle = never_speculated(report)
    if idle:
        lines += ["", f"**Speculation never ran** in the 'on' runs at concurrency {', '.join(map(str, idle))} "
                      "(no drafts in the server's counters: its block-size schedule chose plain decoding, or "
                      "it serves without a drafter), so on and off compared the same decoding there."]
    if report.get("plot"):
        lines += ["", f"![tokens/s, TTFT and ITL on vs off]({report['plot']})"]
    errors = sorted({e for r in report["runs"] for e in r["client"]["errors"]})
    if errors:
        lines += ["", "Errors seen: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def never_speculated(report: dict) -> list[int]:
    """Concurrency levels whose speculation-on run drafted nothing (server counters)."""
    return sorted(r["concurrency"] for r in report["runs"] if r["mode"] == "on"
                  and r.get("server") is not None and not (r["server"].get("num_drafts") or 0) > 0)


def write_plot(report: dict, path) -> None:
    """Output tokens/s, TTFT p50 and ITL p50 against concurrency, speculation on vs off."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (("output_tokens_per_s", "output tokens/s"), ("ttft_ms_p50", "TTFT p50 (ms)"),
              ("itl_ms_p50", "ITL p50 (ms)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, panels):
        for mode, style in (("on", "o-"), ("off", "s--")):
            by_c: dict[int, list] = {}   # several reps of a level: their median
            for r in report["runs"]:
                if r["mode"] == mode and r["client"].get(key) is not None:
                    by_c.setdefault(r["concurrency"], []).append(r["client"][key])
            pts = sorted((c, percentile(v, 50)) for c, v in by_c.items())
            if pts:
                ax.plot([c for c, _ in pts], [v for _, v in pts], style, label=f"speculation {mode}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (users)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
