r"""The `gal-jax` command line.

  gal-jax run --config=configs/tiny_cpu.py --workdir=workdirs/tiny     # the GAL loop, resumable
  gal-jax make-tiny [--out=DIR]                                        # build the tiny default models/data
  gal-jax sample --config=... --prompts=FILE --num_per_prompt=N --out=DIR
  gal-jax evaluate --workdir=DIR [--config=...]                        # TXT-ALN / IMG-ALN / OVF per round
  gal-jax evaluate --workdir=DIR --images=D --prompts=F --references=D --captions=F --clip_path=D
  gal-jax review --workdir=DIR --round=R                               # serve the human-feedback page
  gal-jax bench train|sample|score --config=...                        # compile time, throughput, MFU

Config fields are overridden with `--config.section.field=value` (ml_collections config_flags).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("run", "make-tiny", "sample", "evaluate", "review", "bench")
BENCH_TARGETS = ("train", "sample", "score")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a Python file with get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where rounds, records, checkpoints and the report go.")
_OUT = flags.DEFINE_string("out", None, "Output folder (make-tiny, sample).")
_PROMPTS = flags.DEFINE_string("prompts", None, "Text file with one prompt a line (sample).")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", None, "Images per prompt (sample).")
_IMAGES = flags.DEFINE_string("images", None, "evaluate: a folder of generated images to score.")
_REFERENCES = flags.DEFINE_string("references", None, "evaluate: a folder of reference images.")
_CAPTIONS = flags.DEFINE_string("captions", None, "evaluate: file of plain reference captions, one a line.")
_PLACEHOLDER = flags.DEFINE_string("placeholder", None, "evaluate: placeholder removed from prompts before scoring.")
_CLIP_PATH = flags.DEFINE_string("clip_path", None, "evaluate: CLIP model folder (default: the config's).")
_ROUND = flags.DEFINE_integer("round", None, "Round to review (review).")
_PORT = flags.DEFINE_integer("port", 0, "Port for `review` (0 picks a free one).")
_FORCE = flags.DEFINE_bool("force", False, "make-tiny: rebuild even if present.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize (auto-detects TPU pods and SLURM)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host coordinator host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


class UsageError(app.UsageError):
    """Wrong command or missing flag."""


def _require(flag, name: str, command: str):
    if flag.value is None:
        raise UsageError(f"`gal-jax {command}` needs --{name}")
    return flag.value


def _config(command: str):
    if _CONFIG.value is None:
        raise UsageError(f"`gal-jax {command}` needs --config=configs/<experiment>.py")
    return _CONFIG.value


def _cmd_run(args):
    from gal_jax import driver

    report = driver.run(_config("run"), Path(_require(_WORKDIR, "workdir", "run")))
    print(f"Report: {report}")


def _cmd_make_tiny(args):
    from gal_jax import tiny

    paths = tiny.make_tiny(_OUT.value or tiny.DEFAULT_TINY_DIR, force=_FORCE.value)
    for name, path in paths.items():
        print(f"{name}: {path}")


def _cmd_sample(args):
    from gal_jax import driver

    out = driver.sample_command(
        _config("sample"),
        Path(_require(_PROMPTS, "prompts", "sample")),
        _require(_NUM_PER_PROMPT, "num_per_prompt", "sample"),
        Path(_require(_OUT, "out", "sample")),
    )
    print(f"Images and index.json: {out}")


def _cmd_evaluate(args):
    from gal_jax import evaluate

    captions = evaluate.read_prompt_file(Path(_CAPTIONS.value)) if _CAPTIONS.value else ()
    result = evaluate.evaluate_command(
        Path(_require(_WORKDIR, "workdir", "evaluate")),
        _CONFIG.value,
        images=_IMAGES.value,
        prompts=_PROMPTS.value,
        references=_REFERENCES.value,
        captions=captions,
        clip_path=_CLIP_PATH.value,
        placeholder=_PLACEHOLDER.value,
    )
    print(f"Evaluation: {result}")


def _cmd_review(args):
    from gal_jax import review

    workdir = Path(_require(_WORKDIR, "workdir", "review"))
    server, url = review.serve_review(workdir, _require(_ROUND, "round", "review"), port=_PORT.value)
    print(f"Review page: {url}  (Ctrl-C when saved)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.shutdown()


def _cmd_bench(args):
    from gal_jax import bench

    if len(args) < 3 or args[2] not in BENCH_TARGETS:
        raise UsageError(f"`gal-jax bench` takes one of {', '.join(BENCH_TARGETS)}")
    bench.run(args[2], _config("bench"))


HANDLERS = {
    "run": _cmd_run,
    "make-tiny": _cmd_make_tiny,
    "sample": _cmd_sample,
    "evaluate": _cmd_evaluate,
    "review": _cmd_review,
    "bench": _cmd_bench,
}


def main(argv):
    if len(argv) < 2 or argv[1] not in HANDLERS:
        raise UsageError(f"usage: gal-jax {{{'|'.join(COMMANDS)}}} [flags]; see `gal-jax --help`")
    debug = flags.FLAGS.verbosity >= 1  # --verbosity=1: absl/orbax logs and full tracebacks
    if not debug:
        # absl INFO is orbax's and TFDS's chatter; our progress is printed by the progress bars.
        logging.set_verbosity(logging.WARNING)
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        HANDLERS[argv[1]](argv)
    except (ValueError, FileNotFoundError) as err:
        # Bad input (a file, a folder, a config value): the message names it; a traceback adds noise.
        if debug:
            raise
        sys.exit(f"gal-jax {argv[1]}: error: {err}")


def run():
    """Console-script entry point."""
    if any(arg in ("-h", "-help", "--help") for arg in sys.argv[1:]):
        # absl's --help lists the flags of the __main__ module: the console-script wrapper has none.
        print(__doc__)
        print(flags.FLAGS.module_help(__name__))
        return
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
    # Accept --num-per-prompt as well as --num_per_prompt: diffusers-style spelling.
    argv = [a.replace("--num-per-prompt", "--num_per_prompt") for a in argv]
    return flags.FLAGS(argv)


if __name__ == "__main__":
    sys.exit(run())
