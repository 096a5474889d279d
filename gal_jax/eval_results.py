"""Evaluation results: the per-round results a run wrote, and their JSON and markdown tables.

    DIR/rounds/<r>/eval.json     written by the driver after each round (evaluation enabled)
    DIR/eval/results.json, .md   written by `gal-jax evaluate`
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from gal_jax import io_utils
from gal_jax.workdir import Workdir

NO_ROUND = "-"
METRIC_COLUMNS = (("txt_aln", "TXT-ALN"), ("img_aln", "IMG-ALN"), ("ovf", "OVF (lower is better)"),
                  ("dino", "DINO"))



def write_results(results: Sequence[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Returns (results.json, results.md) after writing the results and their tables, atomically."""
    out_dir = Path(out_dir)
    results = list(results)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    io_utils.write_json(json_path, results)
    io_utils.atomic_write_bytes(md_path, results_markdown(results).encode())
    return json_path, md_path


def results_markdown(results: Sequence[dict]) -> str:
    """Returns markdown: a table per concept (a row per round), then the mean over concepts per round."""
    if not results:
        raise ValueError("no evaluation results to tabulate")
    for position, result in enumerate(results):
        missing = [key for key in ("concept", "txt_aln", "img_aln", "ovf") if key not in result]
        if missing:
            raise ValueError(f"evaluation result #{position} has no {missing[0]!r}: {sorted(result)}")
    scales = sorted({r.get("settings", {}).get("txt_scale", 1.0) for r in results})
    lines = [
        "# Evaluation",
        "",
        "TXT-ALN: mean CLIP cosine(image, its test prompt without the placeholder) x "
        f"{'/'.join(map(str, scales))}. "
        "IMG-ALN: mean cosine over (generated, reference) image pairs. OVF: fraction of images closer to a "
        "plain reference caption than to their test prompt (lower is better). DINO: IMG-ALN with DINOv2.",
    ]
    columns = [(key, title) for key, title in METRIC_COLUMNS if any(key in r for r in results)]
    concepts = list(dict.fromkeys(r["concept"] for r in results))
    for concept in concepts:
        rows = sorted((r for r in results if r["concept"] == concept), key=_round_order)
        header = ["round", *(title for _, title in columns), "images", "references"]
        cells = [[_round_label(r), *(_number(r.get(key)) for key, _ in columns),
                  *(str(r.get("counts", {}).get(count, "")) for count in ("images", "references"))]
                 for r in rows]
        lines += ["", f"## {_cell(concept)}", "", *_table(header, cells)]
    if len(concepts) > 1:
        header = ["round", "concepts", *(title for _, title in columns)]
        lines += ["", "## Mean over concepts", "", *_table(header, _mean_rows(results, columns))]
    return "\n".join(lines) + "\n"


def _mean_rows(results: Sequence[dict], columns) -> list[list[str]]:
    """Returns a row per round: the number of concepts and each metric's mean over them."""
    rows = []
    for order in sorted({_round_order(r) for r in results}):
        group = [r for r in results if _round_order(r) == order]
        means = [np.mean([r[key] for r in group if key in r]) if any(key in r for r in group) else None
                 for key, _ in columns]
        rows.append([_round_label(group[0]), str(len(group)), *map(_number, means)])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def _round_order(result: dict) -> tuple[int, int]:
    """Sorts results without a round (folder evaluations) first, then by round."""
    value = result.get("round")
    return (0, 0) if value is None else (1, int(value))


def _round_label(result: dict) -> str:
    return NO_ROUND if result.get("round") is None else str(result["round"])


def _number(value) -> str:
    return "" if value is None else f"{float(value):.4f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def read_round_results(workdir: str | Path) -> list[dict]:
    """Returns the evaluation results the driver wrote to DIR/rounds/<r>/eval.json, in round order."""
    workdir = Workdir(workdir)
    found = [(r, workdir.round(r).eval) for r in workdir.round_indices() if workdir.round(r).eval.is_file()]
    results = []
    for round_index, path in found:
        entries = io_utils.read_json(path)
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{path}: expected a list of evaluation result objects")
        for entry in entries:
            if entry.setdefault("round", round_index) != round_index:
                raise ValueError(
                    f"{path}: a result says round {entry['round']!r}, but the file is round {round_index}"
                )
        results += entries
    return results
