"""Run studies/theory_underdamped.toml and write results/theory_underdamped/ (summary + figure)."""

from pathlib import Path

import flowlab
from flowlab.theory.figures import theory_figure
from flowlab.theory.report import theory_table

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    study = flowlab.load_study(ROOT / "studies" / "theory_underdamped.toml")
    ds = flowlab.run(study, ROOT / "runs" / "theory_underdamped", overwrite=True).load()
    out = ROOT / "results" / "theory_underdamped"
    out.mkdir(parents=True, exist_ok=True)
    theory_figure(ds, out / "oscillator.png", variant="oscillator", title="heavy ball β = 0.99 (underdamped)")
    lines = ["# Heavy ball in the underdamped regime: the oscillator prediction", "",
             "Regenerate: `python studies/theory_underdamped.py` (MLP 64-64 with BatchNorm on digits, "
             "β = 0.99, η = 0.01, λ = 5e-3, batch 64, 4000 steps).", "",
             "| variant | kind | groups | max rel. error | final |", "|---|---|---|---|---|"]
    for r in theory_table(ds):
        lines.append(f"| {r['variant']} | {r['kind']} | {r['groups']} | {r['max_rel_error']:.2e} | {r['final_rel_error']:.2e} |")
    lines += ["", "![oscillator](oscillator.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
