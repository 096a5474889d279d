r"""Measures GAL's effect on the tiny world: feedback none vs random vs uncertainty + balance.

    python tools/tiny_gal_figures.py --out=workdirs/tiny_figures --config=configs/tiny_world.py
    python tools/tiny_gal_figures.py --out=workdirs/tiny_figures_w1 --config=configs/tiny_world.py \
        --config.gal.balance=false --modes=uncertainty      # new references at weight 1

About 25 minutes on 2 CPU cores for the three modes (README "The tiny world" has the table).

Runs the GAL loop once per feedback mode (workdirs under --out, resumable), evaluates the base
model and every round on the tiny concept's test prompts (TXT-ALN, IMG-ALN, OVF and the rule-based
judge's share of pictures in the prompt's context) and writes figures.json and figures.md (the
README's table) under --out.
"""

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_world.py", "Experiment config.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Folder for the runs and the figures.", required=True)
_MODES = flags.DEFINE_list("modes", ["none", "random", "uncertainty"], "Feedback modes to compare.")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", 4, "Evaluation pictures per test prompt.")


def main(argv):
    from gal_jax import host_malloc

    host_malloc.set_up()  # before jax starts its threads
    from gal_jax import cpu_devices, tiny_figures

    cpu_devices.split_as_configured(_CONFIG.value)  # as `gal-jax run` does

    result = tiny_figures.run_comparison(_OUT.value, _CONFIG.value, _MODES.value, num_per_prompt=_NUM_PER_PROMPT.value)
    print(result["table"])


if __name__ == "__main__":
    app.run(main)
