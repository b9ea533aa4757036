"""One table from the JSON files of gpu_step.py, method_extras.py, train_loop.py, teacher_step.py, memory.py
and inference.py.

    python benchmarks/summary.py DIR      # DIR holds step.json, extras.json, loop.json, teacher.json, memory.json,
                                          # memory_vit.json, teacher_hrda.json, memory_hrda.json, inference.json

A missing or failed part shows as "n/a", so that the rest of a run is still reported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def rows(folder: Path) -> list[tuple[str, str]]:
    step, extras, loop = (_load(folder / f"{n}.json") for n in ("step", "extras", "loop"))
    by = {(r["precision"], r["format"], r["method"]): r for r in step.get("rows", [])}

    def get(precision, fmt, method, key):
        return by.get((precision, fmt, method), {}).get(key)

    def ratio(a, b):
        return a / b if a is not None and b else None

    out = [("device", step.get("device") or loop.get("device") or extras.get("device") or "n/a"),
           ("torch", step.get("torch") or loop.get("torch") or extras.get("torch") or "n/a")]
    for precision in ("fp32", "bf16"):
        for fmt in ("contiguous", "channels_last"):
            for method in ("self_training", "bida"):
                r = by.get((precision, fmt, method))
                if r is None:
                    continue
                out.append((f"step {precision} {fmt} {method}",
                            f"{_fmt(r['step_ms'])} ms, peak {_fmt(r['peak_gib'], '.2f')} GiB, "
                            f"{_fmt(r['tflops'], '.3g')} TFLOP/s ({_fmt(r['pct_peak'], '.1f', '%')} of peak)"))
            st, bida = get(precision, fmt, "self_training", "step_ms"), get(precision, fmt, "bida", "step_ms")
            if st is not None:
                out.append((f"bida / ST {precision} {fmt}", _fmt(ratio(bida, st), ".3f")))
    for method in ("self_training", "bida"):
        fp32, bf16 = get("fp32", "contiguous", method, "step_ms"), get("bf16", "contiguous", method, "step_ms")
        out.append((f"bf16 speedup {method}", _fmt(ratio(fp32, bf16), ".2f", "x")))
        cl = get("bf16", "channels_last", method, "step_ms")
        out.append((f"channels_last / contiguous bf16 {method}", _fmt(ratio(cl, bf16), ".3f")))
        comp = get("bf16", "contiguous compiled", method, "step_ms")
        out.append((f"compiled bf16 {method}", f"{_fmt(comp)} ms, eager / compiled {_fmt(ratio(bf16, comp), '.2f', 'x')}"))
    for dim, ms in extras.get("ms", {}).items():
        out.append((f"extras D={dim}", f"eager {_fmt(ms.get('eager'), '.2f')} ms, compiled {_fmt(ms.get('compiled'), '.2f')} ms, "
                                       f"naive loop {_fmt(ms.get('naive'), '.2f')} ms"))
    if loop:
        out += [("trainer step (bida)", f"{_fmt(1e3 * loop['step_s'])} ms = {_fmt(1 / loop['step_s'], '.2f')} steps/s"),
                ("benchmark step, same model", f"{_fmt(1e3 * loop['benchmark_step_s'])} ms"),
                ("trainer / benchmark", _fmt(loop["trainer_over_benchmark"], ".3f")),
                ("data wait", f"{_fmt(1e3 * loop['data_s'])} ms a step"),
                ("pseudo labels", f"{_fmt(loop['pseudo_label_images_per_s'], '.2f')} images/s"),
                ("evaluation whole", f"{_fmt(loop['eval_whole_images_per_s'], '.2f')} images/s"),
                ("evaluation slide", f"{_fmt(loop['eval_slide_images_per_s'], '.2f')} images/s")]
    else:
        out.append(("trainer loop", "n/a"))
    for file in ("teacher.json", "teacher_hrda.json"):
        teacher = _load(folder / file)
        hrda = " hrda" if teacher.get("hrda") else ""
        by_t = {(r["precision"], r["method"]): r for r in teacher.get("rows", [])}
        for (precision, method), r in by_t.items():
            out.append((f"teacher step {teacher.get('backbone', '')}{hrda} {precision} {method}",
                        f"{_fmt(r['step_ms'])} ms, peak {_fmt(r['peak_gib'], '.2f')} GiB"
                        + (f", / {r['base']} {_fmt(r['over_base'], '.3f')}" if r.get("base", method) != method else "")))
        if not by_t:
            out.append((f"teacher step ({file})", "n/a"))
    for file in ("memory.json", "memory_vit.json", "memory_hrda.json"):
        memory = _load(folder / file)
        hrda = " hrda" if memory.get("hrda") else ""
        by_m = {(r["method"], r["grad_checkpoint"]): r for r in memory.get("rows", [])}
        for method in dict.fromkeys(m for m, _ in by_m):
            plain, ckpt = by_m.get((method, False)), by_m.get((method, True))
            if plain is None or ckpt is None:
                continue
            approx = "~" if ckpt.get("approximate") else ""
            out.append((f"memory {memory.get('backbone', '')}{hrda} {memory.get('precision', '')} {method} grad_checkpoint",
                        f"peak {approx}{_fmt(plain['peak_gib'], '.2f')} -> {approx}{_fmt(ckpt['peak_gib'], '.2f')} GiB "
                        f"(x{_fmt(ckpt['peak_ratio'], '.3f')}), step {_fmt(plain['step_ms'])} -> {_fmt(ckpt['step_ms'])} ms"))
        if not by_m:
            out.append((f"memory with grad_checkpoint ({file})", "n/a"))
    inference = _load(folder / "inference.json").get("rows", [])
    for r in inference:
        out.append((f"inference {r['backend']} {r['size']}",
                    f"{_fmt(r['images_per_s'])} images/s, peak {_fmt(r['peak_mib'], '.0f')} MiB"))
    if not inference:
        out.append(("inference", "n/a"))
    return out


def main(argv: list[str] | None = None) -> None:
    folder = Path((argv if argv is not None else sys.argv[1:])[0])
    table = rows(folder)
    width = max(len(k) for k, _ in table)
    print(f"| {'figure':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for key, value in table:
        print(f"| {key:<{width}} | {value} |")


if __name__ == "__main__":
    main()
