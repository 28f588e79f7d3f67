"""The paper's loss ablation: the same training with loss terms switched off, at equal steps.

Each variant is a full training run (a child of one MLflow run for the whole ablation),
evaluated at its last step on the paired test split; the table lists photo->labels per-pixel
accuracy, per-class accuracy and class IoU (the paper's FCN-score columns) and labels->photo L1.
"""

from __future__ import annotations

import json
import time

from pipeline import config as C
from pipeline import runs, storage, tracking
from pipeline.config import Config
from pipeline.plan import resolve

# Domain A is the label maps, B the photos: the forward cycle is A -> B -> A (lambda_A).
VARIANTS: dict[str, tuple[str, dict]] = {
    "cycle_alone": ("Cycle alone", {"lambda_gan": 0.0}),
    "gan_alone": ("GAN alone", {"lambda_A": 0.0, "lambda_B": 0.0}),
    "gan_forward": ("GAN + forward cycle", {"lambda_B": 0.0}),
    "gan_backward": ("GAN + backward cycle", {"lambda_A": 0.0}),
    "cyclegan": ("CycleGAN", {}),
}
COLUMNS = (
    ("eval/per_pixel_acc", "Per-pixel acc."),
    ("eval/per_class_acc", "Per-class acc."),
    ("eval/class_iou", "Class IOU"),
    ("eval/l1_AtoB", "labels->photo L1"),
)


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(
            f"--variants {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(VARIANTS)}"
        )
    return names


def variant_config(base: Config, variant: str, name: str) -> Config:
    """``base`` with the variant's loss terms off; a run named ``NAME-VARIANT``."""
    loss = dict(VARIANTS[variant][1])
    return C.merge(base, {"loss": loss, "storage": {"name": f"{name}-{variant}", "resume": False}})


def table(rows: list[dict]) -> str:
    """The paper-style Markdown table of the rows (``variant``, ``steps`` and the columns)."""
    head = ["Loss", *(title for _, title in COLUMNS), "Steps"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        cells = [VARIANTS[row["variant"]][0]]
        for key, _ in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else f"{value:.3f}")
        cells.append(str(row.get("steps", "-")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablate(base: Config, name: str, variants: list[str]) -> dict:
    """Train ``base`` once per variant (runs ``NAME-VARIANT``, children of one MLflow run),
    write ``results.md``/``results.json`` under the storage and return the rows."""
    from pipeline.training import train

    base = C.with_defaults(base)
    first = resolve(variant_config(base, variants[0], name))
    if not first.paired:
        raise ValueError(
            f"--data {storage.redact(base.data.uri)}: the ablation scores photo->labels on a "
            "paired test split (testA/testB of the same scenes), which this dataset lacks"
        )
    taken = [v for v in variants if runs.exists(base.storage.uri, f"{name}-{v}")]
    if taken:
        raise ValueError(f"--name {name}: runs {', '.join(f'{name}-{v}' for v in taken)} exist")
    parent = tracking.start_run(base, name, {"kind": "ablation", "ablation": name})
    print(f"[ablation] {name}: {', '.join(variants)}; MLflow parent run {parent}", flush=True)
    rows = []
    try:
        for variant in variants:
            started = time.time()
            plan = first.with_config(variant_config(base, variant, name))
            result = train(plan, parent_run_id=parent)
            row = {
                "variant": variant,
                "run": result.name,
                "mlflow_run_id": result.run_id,
                "steps": result.step,
                "seconds": round(time.time() - started, 1),
                **{k: result.metrics.get(k) for k, _ in COLUMNS},
            }
            rows.append(row)
            print(f"[ablation] {variant}: {json.dumps(row)}", flush=True)
    except BaseException:
        tracking.finish_run(base, parent, "FAILED")
        raise
    text = table(rows)
    rows_json = json.dumps(rows, indent=2) + "\n"
    out = storage.join(base.storage.uri, name)
    fs, path = storage.resolve(out)
    fs.create_dir(path, recursive=True)
    storage.write_bytes_atomic(fs, f"{path}/results.md", text.encode())
    storage.write_bytes_atomic(fs, f"{path}/results.json", rows_json.encode())
    metrics = {
        f"{row['variant']}/{key}": row[key]
        for row in rows
        for key, _ in COLUMNS
        if row.get(key) is not None
    }
    texts = {"results.md": text, "results.json": rows_json}
    tracking.log_summary(base, parent, texts, metrics, {}, "ablation")
    tracking.finish_run(base, parent, "FINISHED")
    return {"name": name, "rows": rows, "table": text, "results": f"{out}/results.md"}
