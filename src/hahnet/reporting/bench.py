"""The benchmark's report: the measured table with the ratios a/b, c/a, a/d and a verdict
against the targets, and its JSON file (the measurements are :mod:`hahnet.experiments.bench`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STEP_LABELS = {  # the training steps a benchmark result holds, in table order
    "hah": "(a) HaH step, HaHObjective",
    "plain": "(b) plain CE step, same HaH net",
    "reference": "(c) reference procedure step",
    "standard": "(d) standard network CE step",
}

RATIO_LABELS = {"hah_over_plain": "a/b HaH / plain", "reference_over_hah": "c/a reference / HaH",
                "hah_over_standard": "a/d HaH / standard"}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f}"


def _verdict(target: dict[str, Any], value: float, width: float) -> str:
    """``value`` against its target as the result records it (compare, bound, applies)."""
    compare, bound, applies = target["compare"], target["bound"], target["applies"]
    if applies == "width 1.0" and not math.isclose(width, 1.0):
        return f"(target {compare} {bound:g} at width 1.0)"
    ok = value <= bound if compare == "<=" else value >= bound
    return f"target {compare} {bound:g}: {'met' if ok else 'NOT met'}"


def format_report(result: dict[str, Any]) -> str:
    """The benchmark result as a plain-text table."""
    m = result["machine"]
    cfg = result["config"]
    lines = [f"hahnet bench: torch {m['torch']}, {m['threads']} threads, {m['cpu']} "
             f"(capability {m['cpu_capability']}, avx512_bf16 {m['avx512_bf16']}, "
             f"amx {m['amx_bf16']}), {m.get('malloc', 'default')} malloc; "
             + (f"on {m['gpu']} (CUDA {m['cuda']}); " if m.get("gpu") else "") +
             f"{cfg.get('clock', 'wall')} clock, medians of {cfg['repeats']} interleaved "
             f"rounds after {cfg['warmup']} warm-up"]
    for run in result["runs"]:
        lines.append("")
        lines.append(f"== {run.get('model', 'vgg16')} width {run['width']:g}, "
                     f"batch {run['batch_size']}, "
                     f"{run['precision']}, {'channels-last' if run['channels_last'] else 'NCHW'}")
        if "steps" in run:
            lines.append(f"  {'training step (fwd+bwd+Adam)':36s} {'median ms':>9s} {'min ms':>9s}")
            steps = run["steps"]
            for name in [*(n for n in STEP_LABELS if n in steps),
                         *(n for n in steps if n not in STEP_LABELS)]:
                lines.append(f"  {STEP_LABELS.get(name, name):36s} "
                             f"{_ms(steps[name]['median_s'])} {_ms(steps[name]['min_s'])}")
            r = run["ratios"]
            lines += [f"  {label:21s}= {r[key]:6.3f}   "
                      f"{_verdict(result['targets'][key], r[key], run['width'])}"
                      for key, label in RATIO_LABELS.items()]
        if "blocks" in run:
            lines.append(f"  {'block fwd+bwd (e)':36s} {'median ms':>9s}")
            for entry in run["blocks"]:
                name = (f"{entry['block']} {entry['channels']}x{entry['resolution']}x"
                        f"{entry['resolution']}")
                lines.append(f"  {name:36s} {_ms(entry['median_s'])}")
        if "eval" in run:
            ev = run["eval"]
            lines.append(f"  eval (f): clean {ev['clean']['images_per_s']:.0f} images/s "
                         f"(batch {ev['clean']['batch_size']})")
            apgd = ev.get("apgd", {})
            if "skipped" in apgd:
                lines.append(f"  eval (f): APGD-CE skipped: {apgd['skipped']}")
            elif apgd:
                lines.append(f"  eval (f): APGD-CE {apgd['iter_images_per_s']:.0f} iterations x "
                             f"images/s ({apgd['steps']} steps, batch {apgd['batch_size']})")
    lines.append("")
    lines.append(f"total {result['seconds']:.0f} s")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write a :func:`run_benchmark` result as JSON (creating the folder)."""
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
