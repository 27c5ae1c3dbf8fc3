"""The benchmark's figures: per system and batch size, the median over processes with its min and max, printed
as a table, written as JSON and drawn as a bar chart."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

# Each of our systems is compared with the systems of its own precision: int4 with onnxruntime-genai's int4
# build and llama.cpp on the Q4_1 file, the others with genai's fp32 build and transformers.
COMPARISONS = {"int4": ("genai-int4", "llama.cpp"), "fp32": ("genai-fp32", "transformers")}


def comparisons(system: str) -> tuple[str, str]:
    return COMPARISONS["int4" if "int4" in system else "fp32"]


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def format(self, digits: int) -> str:
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"


@dataclass(frozen=True)
class Row:
    system: str
    batch_size: int
    ours: bool
    runs: int
    failures: int
    prefill_ms: Spread | None
    decode_tokens_per_second: Spread | None
    peak_rss_mb: Spread | None


def summarise(measurements: list[dict], systems: list[str], ours: set[str], batch_sizes: list[int]) -> list[Row]:
    rows = []
    for system in systems:
        for batch_size in batch_sizes:
            runs = [item for item in measurements if item["system"] == system and item["batch_size"] == batch_size]
            done = [item for item in runs if "error" not in item]
            spread = lambda key, done=done: Spread.of([item[key] for item in done]) if done else None
            rows.append(Row(system, batch_size, system in ours, len(done), len(runs) - len(done),
                            spread("prefill_ms"), spread("decode_tokens_per_second"), spread("peak_rss_mb")))
    return rows


def _ratios(row: Row, baseline: Row | None) -> str:
    """Our decode tok/s over the baseline's, and the baseline's prefill ms over ours: above 1, ours is faster."""
    if not row.ours or not row.runs or baseline is None or not baseline.runs:
        return ""
    assert row.prefill_ms and row.decode_tokens_per_second  # a row with runs has their spreads
    assert baseline.prefill_ms and baseline.decode_tokens_per_second
    decode = row.decode_tokens_per_second.median / baseline.decode_tokens_per_second.median
    prefill = baseline.prefill_ms.median / row.prefill_ms.median
    return f"{decode:.2f}x / {prefill:.2f}x"


def format_table(rows: list[Row]) -> str:
    by_key = {(row.system, row.batch_size): row for row in rows}
    header = f"{'system':<14} {'batch':>5}  {'prefill ms':<24} {'decode tok/s':<24} {'peak RSS MB':>11}  vs"
    lines = [header, "-" * (len(header) + 40)]
    for row in rows:
        if not row.runs:
            lines.append(f"{row.system:<14} {row.batch_size:>5}  failed in all {row.failures} processes (see above)")
            continue
        assert row.prefill_ms and row.decode_tokens_per_second and row.peak_rss_mb  # a row with runs has their spreads
        ratios = "  ".join(f"{name} {ratio}" for name in comparisons(row.system)
                           if (ratio := _ratios(row, by_key.get((name, row.batch_size)))))
        failed = f"  ({row.failures} of {row.runs + row.failures} failed)" if row.failures else ""
        lines.append(f"{row.system:<14} {row.batch_size:>5}  {row.prefill_ms.format(1):<24} "
                     f"{row.decode_tokens_per_second.format(1):<24} {row.peak_rss_mb.median:>11.0f}  "
                     f"{ratios}{failed}".rstrip())
    lines.append("median [min-max] over processes; prefill: one forward over the whole batch; decode: tokens/s of "
                 "all rows together")
    lines.append("vs X a / b: our decode tok/s over X's, then X's prefill ms over ours (above 1: ours is faster); "
                 "int4 against int4 systems, the rest against fp32 ones")
    return "\n".join(lines)


def token_agreement(measurements: list[dict], systems: list[str]) -> str:
    """How many greedy tokens (row 0, first process) each system shares with the first system's from the start:
    a check that every system ran the same model on the same prompt."""
    first: dict[tuple[str, int], dict] = {}
    for item in measurements:
        if "error" not in item:
            first.setdefault((item["system"], item["batch_size"]), item)
    keys = sorted(first, key=lambda key: (systems.index(key[0]), key[1]))
    if not keys:
        return ""
    reference = first[keys[0]]["tokens"]
    parts = []
    for system, batch_size in keys:
        item = first[(system, batch_size)]
        same = next((index for index, (a, b) in enumerate(zip(item["tokens"], reference)) if a != b), len(reference))
        parts.append(f"{system} b{batch_size} {same}" + ("" if item["rows_identical"] else " (rows differ)"))
    return (f"greedy tokens equal to {keys[0][0]} batch {keys[0][1]}'s from the start (of {len(reference)}): "
            + ", ".join(parts))


def write_chart(rows: list[Row], path: Path, title: str) -> bool:
    """Bars of decode tok/s and prefill ms per batch size, min-max as error bars. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    systems = list(dict.fromkeys(row.system for row in rows))
    batch_sizes = sorted({row.batch_size for row in rows})
    by_key = {(row.system, row.batch_size): row for row in rows if row.runs}
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(systems)
    for axis, field, heading in ((axes[0], "decode_tokens_per_second", "decode tokens/s (higher is better)"),
                                 (axes[1], "prefill_ms", "prefill ms, 128 tokens (lower is better)")):
        for index, system in enumerate(systems):
            spreads = [getattr(by_key[(system, size)], field) if (system, size) in by_key else None
                       for size in batch_sizes]
            medians = [spread.median if spread else 0 for spread in spreads]
            errors = [[spread.median - spread.low if spread else 0 for spread in spreads],
                      [spread.high - spread.median if spread else 0 for spread in spreads]]
            positions = [group + (index - (len(systems) - 1) / 2) * width for group in range(len(batch_sizes))]
            axis.bar(positions, medians, width, yerr=errors, capsize=2, label=system)
        axis.set_xticks(range(len(batch_sizes)), [f"batch {size}" for size in batch_sizes])
        axis.set_title(heading, fontsize=10)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
