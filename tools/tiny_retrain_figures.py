r"""Retrains from the base model on given training sets, once per train seed, and evaluates every
model as tools/tiny_gal_figures.py does (`gal_jax/tiny_retrain.py`): what a training set does,
apart from one training run's luck.

    python tools/tiny_retrain_figures.py --out=workdirs/dilution --seeds=0,1,2,3 \
        --train_set=references=workdirs/tiny_figures/none/rounds/1 \
        --train_set=round_4=workdirs/tiny_figures/uncertainty/rounds/4

Each --train_set is NAME=FOLDER, the folder a round's `train_set` or the round folder holding one
(a GAL run's round N trains on the references plus the images queried in rounds 1..N-1, each at
its recorded weight). Writes figures.json and figures.md (a row per set and seed, and each set's
mean) under --out. About 40 s a model on 2 CPU cores (200 steps, 40 evaluation pictures).
"""

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_world.py", "Experiment config.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Folder for the figures.", required=True)
_TRAIN_SETS = flags.DEFINE_multi_string("train_set", None, "NAME=FOLDER: a training set to train on "
                                        "(a round's train_set, or the round folder).", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3"], "Train seeds (config.train.seed).")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", 4, "Evaluation pictures per test prompt.")


def main(argv):
    del argv
    from gal_jax import host_malloc

    host_malloc.set_up()  # before jax starts its threads
    from gal_jax import cpu_devices, io_utils, tiny_retrain

    try:
        sets = tiny_retrain.parse_train_sets(_TRAIN_SETS.value)
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError as e:
        raise app.UsageError(str(e))
    cpu_devices.split_as_configured(_CONFIG.value)  # as `gal-jax run` does
    io_utils.enable_compilation_cache()
    rows = tiny_retrain.retrain(_CONFIG.value, sets, seeds, num_per_prompt=_NUM_PER_PROMPT.value)
    text = tiny_retrain.table(rows)
    out = Path(_OUT.value).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    io_utils.write_json(out / "figures.json", {"rows": rows, "train_sets": {n: str(p) for n, p in sets.items()},
                                               "num_per_prompt": _NUM_PER_PROMPT.value, "table": text})
    io_utils.atomic_write_bytes(out / "figures.md", (text + "\n").encode())
    print(text)


if __name__ == "__main__":
    app.run(main)
