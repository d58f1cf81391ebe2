"""Scaling curve of the reference drafters: tau per dataset against training minutes, for DSpark and the
DFlash ablation, from the quickstart runs that `benchmarks/reference_drafter.sh` leaves behind.

Each run folder is `<runs>/<recipe>-<minutes>min/` with the quickstart's `results.json` (a fresh drafter
trained for that budget, its learning rate annealed to the budget's end, then evaluated on held-out prompts).
The JSON keeps one curve per training recipe (`--curve`): a run replaces its own curve's points and keeps the
others, so the curves of earlier recipes stay beside the new one (dashed in the plot).

    python benchmarks/scaling_curve.py --runs outputs/reference
    # writes benchmarks/results/smollm2_scaling.json and smollm2_scaling.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from dspark_hf.hardware import cpu_description

RESULTS = Path(__file__).resolve().parent / "results"
CURRENT_CURVE = "warm_start_muon_cache"
RUN_FOLDER = re.compile(r"(?P<recipe>[a-z_]+)-(?P<minutes>\d+(?:\.\d+)?)min")


def read_run(folder: Path) -> dict | None:
    """One point of the curve from a finished quickstart run, or None if the folder holds none."""
    match = RUN_FOLDER.fullmatch(folder.name)
    path = folder / "results.json"
    if not match or not path.exists():
        return None
    results = json.loads(path.read_text())
    methods = [name for name in ("dspark", "dspark_scheduled") if name in results]
    return {
        "recipe": match["recipe"],
        "minutes": float(match["minutes"]),
        "steps": results["training"]["steps"],
        "held_out_teacher_forced": results["held_out_teacher_forced"],
        "per_dataset": {
            dataset: {
                method: {
                    key: summary[key]
                    for key in ("tau", "speedup_vs_plain", "conditional_acceptance", "prompts", "new_tokens")
                }
                for method, summary in by_method.items()
                if method in methods
            }
            for dataset, by_method in results["per_dataset"].items()
        },
        "greedy_identical": results["greedy_identical"],
        "eval": {
            "prompts_per_dataset": results["options"]["eval_prompts_per_set"],
            "max_new_tokens": results["max_new_tokens"],
        },
    }


def held_out_tau(point: dict) -> float:
    """Teacher-forced expected tau of the point's drafter on the held-out on-policy answers."""
    return point["held_out_teacher_forced"]["expected_tau"]


def read_curves(path: Path) -> dict[str, dict]:
    """The curves already in `path` by name; a file of the single-curve layout (`points` at the top) holds
    the first recipe's curve, random initialisation and AdamW."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if "curves" in saved:
        return saved["curves"]
    return {
        "random_init_adamw": {
            "command": saved["command"],
            "machine": "2-core Intel Xeon with AMX (bfloat16 matrix units)",
            "points": saved["points"],
        }
    }


def plot(curves: dict[str, dict], current: str, path: Path) -> None:
    """tau against training minutes, one line per recipe and curve (earlier curves dashed): one panel per
    evaluation dataset (full block, greedy) and one for the teacher-forced expected tau on the held-out
    on-policy answers (100 answers x 64 anchors: the least noisy of the panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for curve in curves.values() for p in curve["points"]]
    datasets = sorted({d for p in points for d in p["per_dataset"]})
    panels = [
        (d, "tau, full block, greedy", lambda p, d=d: p["per_dataset"][d]["dspark"]["tau"]) for d in datasets
    ]
    panels.append(("held-out answers, teacher-forced", "expected tau", held_out_tau))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, ylabel, tau_of) in zip(axes[0], panels):
        for name, curve in curves.items():
            for recipe in sorted({p["recipe"] for p in curve["points"]}):
                xy = sorted((p["minutes"], tau_of(p)) for p in curve["points"] if p["recipe"] == recipe)
                style = "-" if name == current else "--"
                ax.plot(*zip(*xy), style, marker="o", label=f"{recipe} ({name})")
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_xlabel("training minutes (1 thread; machines in the JSON)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=Path("outputs/reference"))
    parser.add_argument("--output", type=Path, default=RESULTS / "smollm2_scaling.json")
    parser.add_argument("--curve", default=CURRENT_CURVE, help="Name of the recipe these runs trained with.")
    args = parser.parse_args()
    points = [p for folder in sorted(args.runs.iterdir()) if folder.is_dir() and (p := read_run(folder))]
    if not points:
        raise SystemExit(f"no finished '<recipe>-<minutes>min' run folders under {args.runs}")
    points.sort(key=lambda p: (p["recipe"], p["minutes"]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    curves = read_curves(args.output)
    curves[args.curve] = {
        "command": "bash benchmarks/reference_drafter.sh",
        "machine": cpu_description(),
        "points": points,
    }
    args.output.write_text(json.dumps({"curves": curves}, indent=2) + "\n")
    plot(curves, args.curve, args.output.with_suffix(".png"))
    for p in points:
        taus = ", ".join(f"{d} {v['dspark']['tau']:.2f}" for d, v in p["per_dataset"].items())
        print(
            f"{p['recipe']:>8} {p['minutes']:>5g} min, {p['steps']:>5} steps: tau {taus}; "
            f"held-out teacher-forced {held_out_tau(p):.2f}"
        )
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
