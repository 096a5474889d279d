"""What a training set does, apart from one training run's luck: retrain from the base model on
given training sets, once per train seed, and evaluate every model as the tiny world's figures 3-4
do (`tiny_figures.TestPromptEvaluation`). `tools/tiny_retrain_figures.py` is its command.

DreamBooth on the tiny world is chaotic: one run's figures move with the train seed about as much
as GAL's rounds move them, so a difference between two training sets (say a GAL run's round 1 and
round 4 sets, which differ by the queried images only) means something only across seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gal_jax import personalize, sharding, tiny_figures, trainer as trainer_lib

COLUMNS = ("txt_aln", "img_aln", "ovf", "judge_context")


def parse_train_sets(specs: Sequence[str]) -> dict[str, Path]:
    """Returns {name: train_set folder} from NAME=FOLDER specs, FOLDER a round's `train_set` or the
    round folder holding one; raises ValueError naming a bad spec."""
    sets: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--train_set={spec!r}: expected NAME=FOLDER")
        if name in sets:
            raise ValueError(f"--train_set: the name {name!r} is given twice")
        path = Path(folder).expanduser().absolute()
        if (path / "train_set").is_dir():
            path = path / "train_set"
        if not path.is_dir():
            raise ValueError(f"--train_set={spec!r}: {path} is not a folder (a round's train_set, or the round)")
        sets[name] = path
    return sets


def retrain(config, train_sets: dict[str, Path], seeds: Sequence[int], *, num_per_prompt: int,
            progress: bool = True) -> list[dict[str, Any]]:
    """Returns a row per (seed, set): the set's name, the seed, `COLUMNS` of the model trained
    from the config's base model on the set with config.train.seed = seed, and its train_loss."""
    evaluation = tiny_figures.TestPromptEvaluation.from_config(config, num_per_prompt=num_per_prompt)
    train_mesh = sharding.train_mesh_from_config(config.mesh, evaluation.mesh)  # as `gal-jax run` trains
    rows = []
    for seed in seeds:
        seeded = config.copy_and_resolve_references()
        seeded.train.seed = int(seed)
        sd, method = personalize.prepare(seeded, evaluation.sd, placeholder=evaluation.concept.placeholder or "",
                                         class_word=seeded.data.class_word)
        trainer = trainer_lib.Trainer(seeded, sd, train_mesh, method)
        for name, train_set in train_sets.items():
            result, metrics = trainer.train_round(evaluation.params, train_set, progress=progress,
                                                  desc=f"{name}, seed {seed}")
            figures = evaluation.figures(sd, result.apply(evaluation.params))
            rows.append({"set": name, "seed": int(seed), **figures, "train_loss": metrics["loss"]})
            if progress:
                print(f"{name}, seed {seed}: " + ", ".join(f"{c} {figures[c]:.3f}" for c in COLUMNS), flush=True)
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Returns the markdown table: a row per set and seed, then each set's mean over its seeds."""
    lines = ["| training set | seed | TXT-ALN | IMG-ALN | OVF | judge: in context |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['set']} | {r['seed']} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |" for r in rows]
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]
        lines.append(f"| **{name}** | mean of {len(mine)} | "
                     + " | ".join(f"{np.mean([r[c] for r in mine]):.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)
