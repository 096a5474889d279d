r"""The `gal-jax` command line.

  gal-jax run --config=configs/tiny_cpu.py --workdir=workdirs/tiny     # the GAL loop, resumable
  gal-jax export --workdir=DIR [--round=R] --out=FOLDER [--dtype=float16|float32]
                                                                       # a round's model, diffusers layout
  gal-jax sample --workdir=DIR [--round=R] --prompts=FILE [--num_per_prompt=N] [--out=DIR]
                                                                       # images from a run's model
  gal-jax sample --config=... --prompts=FILE --num_per_prompt=N --out=DIR   # images from a base model
  gal-jax make-tiny [--out=DIR]                                        # build the tiny default models/data
  gal-jax make-tiny --train --out=DIR [--seed=S] [--recipe=twin_swap_wide|first|smoke|object_negatives|swap_negatives|swap_lit|twin_lit] [--num_train=N] [--vae_from=SD_DIR] [--clip_from=CLIP_DIR]
                                                                       # retrain the tiny world's models
  gal-jax evaluate --workdir=DIR                                       # TXT-ALN / IMG-ALN / OVF per round
  gal-jax evaluate --workdir=DIR --images=D --prompts=F --references=D --captions=F --clip_path=D
  gal-jax review --workdir=DIR --round=R                               # serve the human-feedback page
  gal-jax bench train|sample|score|unet|load|round|all --config=...    # throughput, MFU, vs PyTorch, a round vs its floor

Config fields are overridden with `--config.section.field=value` (ml_collections config_flags).

Exit codes: 0 done; 1 an error (bad input file, damaged or busy workdir, ...); 2 a usage error
(unknown command or flag, bad config file or value); 3 the run waits for human feedback (open the
review page it names, save the selections, rerun). Errors print one line
`gal-jax <command>: error: ...`; `--verbosity=1` adds the traceback and absl's logs.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import importlib.machinery
import importlib.util
import os
import sys
import traceback
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("run", "export", "sample", "make-tiny", "evaluate", "review", "bench")
BENCH_TARGETS = ("train", "sample", "score", "unet", "load", "memory", "round", "all")
EXIT_ERROR, EXIT_USAGE, EXIT_AWAITING_FEEDBACK = 1, 2, 3

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a Python file with get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where rounds, records, checkpoints and the report go.")
_OUT = flags.DEFINE_string("out", None, "Output folder (make-tiny, sample, export).")
_PROMPTS = flags.DEFINE_string("prompts", None, "Text file with one prompt a line (sample).")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", None, "Images per prompt (sample).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float16", "float32", "bfloat16"],
                           "export: weight dtype of the exported UNet (default: the run's export.dtype).")
_IMAGES = flags.DEFINE_string("images", None, "evaluate: a folder of generated images to score.")
_REFERENCES = flags.DEFINE_string("references", None, "evaluate: a folder of reference images.")
_CAPTIONS = flags.DEFINE_string("captions", None, "evaluate: file of plain reference captions, one a line.")
_PLACEHOLDER = flags.DEFINE_string("placeholder", None, "evaluate: placeholder removed from prompts before scoring.")
_CLIP_PATH = flags.DEFINE_string("clip_path", None, "evaluate: CLIP model folder (default: the config's).")
_ROUND = flags.DEFINE_integer("round", None, "Round to review, export or sample from (default: the last).")
_PORT = flags.DEFINE_integer("port", 0, "Port for `review` (0 picks a free one).")
_FORCE = flags.DEFINE_bool("force", False, "make-tiny: rebuild even if present.")
_TRAIN = flags.DEFINE_bool("train", False, "make-tiny: retrain the tiny CLIP, VAE and UNet on the tiny world.")
_SEED = flags.DEFINE_integer("seed", 0, "make-tiny --train: seed of the world and of the training.")
_RECIPE = flags.DEFINE_enum("recipe", "twin_swap_wide", ["twin_swap_wide", "first", "smoke", "object_negatives",
                                                                "swap_negatives", "swap_lit", "twin_lit"],
                            "make-tiny --train: model sizes and schedules (twin_swap_wide: the shipped models' "
                            "recipe, below; first: the session-5 recipe; smoke: a few steps of small models; "
                            "object_negatives, swap_negatives: CLIP with object-swap, or object- and colour-swap, hard "
                            "negatives; swap_lit: swap_negatives, then a new, wider vision tower against its locked "
                            "text tower; twin_lit: swap_lit's towers trained on minimal pairs (each picture beside "
                            "its twin with another object kind or colour) instead of caption negatives; twin_swap_wide: "
                            "twins and swap negatives, the wide vision tower in both stages).")
_VAE_FROM = flags.DEFINE_string("vae_from", None, "make-tiny --train: keep this SD folder's VAE instead of training one.")
_CLIP_FROM = flags.DEFINE_string(
    "clip_from", None, "make-tiny --train: keep this CLIP folder (a build's clip/) instead of training CLIP; its text "
    "tower becomes SD's text encoder.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", None, "make-tiny --train: pretraining pictures (default 10000).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize (auto-detects TPU pods and SLURM)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host coordinator host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


class UsageError(ValueError):
    """Wrong command, missing or bad flag, bad config file: exit code 2."""


def _require(flag, name: str, command: str):
    if flag.value is None:
        raise UsageError(f"`gal-jax {command}` needs --{name}")
    return flag.value


def _config(command: str):
    """Returns --config's config; on a CPU host, splits the CPU into config.mesh.cpu_devices JAX
    devices first (gal_jax/cpu_devices.py: before the backend starts)."""
    if _CONFIG.value is None:
        raise UsageError(f"`gal-jax {command}` needs --config=configs/<experiment>.py")
    from gal_jax import cpu_devices

    try:
        cpu_devices.split_as_configured(_CONFIG.value)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return _CONFIG.value


def _cmd_run(args):
    from gal_jax import workdir

    config, root = _config("run"), Path(_require(_WORKDIR, "workdir", "run"))
    status = workdir.completed_run(root, config)
    if status is not None:  # answered before JAX and the models load
        print(workdir.Workdir(root).complete_message(status))
        return
    from gal_jax import driver

    try:
        driver.check_config(config)
    except ValueError as err:
        raise UsageError(str(err)) from None
    report = driver.run(config, root)
    print(f"Report: {report}")


def _cmd_export(args):
    from gal_jax import outputs

    out = outputs.export_round(_require(_WORKDIR, "workdir", "export"), _ROUND.value,
                               _require(_OUT, "out", "export"), _DTYPE.value)
    print(f"Model (diffusers layout): {out}")


def _cmd_make_tiny(args):
    from gal_jax import tiny

    if _TRAIN.value:
        from gal_jax import tiny_build, tiny_train

        out = Path(_require(_OUT, "out", "make-tiny --train"))
        num_train = tiny_build.NUM_TRAIN if _NUM_TRAIN.value is None else _NUM_TRAIN.value
        if num_train < 1:
            raise UsageError(f"--num_train={num_train} must be >= 1")
        try:
            report = tiny_build.train_tiny_world(out, seed=_SEED.value, recipe=tiny_train.RECIPES[_RECIPE.value],
                                                 num_train=num_train, vae_from=_VAE_FROM.value,
                                                 clip_from=_CLIP_FROM.value)
        except ValueError as error:
            raise UsageError(str(error)) from error
        print(report.summary())
        print(f"Models: {out / 'clip'}, {out / 'sd'}; figures: {out / tiny_build.REPORT_FILE}")
        return
    paths = tiny.make_tiny(_OUT.value or tiny.DEFAULT_TINY_DIR, force=_FORCE.value)
    for name, path in paths.items():
        print(f"{name}: {path}")


def _cmd_sample(args):
    from gal_jax import outputs

    prompts = Path(_require(_PROMPTS, "prompts", "sample"))
    if _NUM_PER_PROMPT.value is not None and _NUM_PER_PROMPT.value < 1:
        raise UsageError(f"--num_per_prompt={_NUM_PER_PROMPT.value} must be >= 1")
    if _WORKDIR.value is not None:
        if _CONFIG.value is not None:
            raise UsageError("`gal-jax sample` takes --workdir (a run's model) or --config (a base model), not both")
        out = outputs.sample_from_run(_WORKDIR.value, _ROUND.value, prompts, _NUM_PER_PROMPT.value, _OUT.value)
    else:
        from gal_jax import driver

        config = _config("sample")
        try:
            driver.check_sampling(config.sample, "sample")
        except ValueError as err:
            raise UsageError(str(err)) from None
        out = outputs.sample_base(config, prompts, _require(_NUM_PER_PROMPT, "num_per_prompt", "sample"),
                                  _require(_OUT, "out", "sample"))
    print(f"Images and index.json: {out}")


def _cmd_evaluate(args):
    from gal_jax import evaluate

    captions = evaluate.read_prompt_file(Path(_CAPTIONS.value)) if _CAPTIONS.value else ()
    result = evaluate.evaluate_command(
        Path(_require(_WORKDIR, "workdir", "evaluate")),
        _config("evaluate") if _CONFIG.value is not None else None,  # scores on the config's CPU split
        images=_IMAGES.value,
        prompts=_PROMPTS.value,
        references=_REFERENCES.value,
        captions=captions,
        clip_path=_CLIP_PATH.value,
        placeholder=_PLACEHOLDER.value,
    )
    print(f"Evaluation: {result}")


def _cmd_review(args):
    from gal_jax import review_server

    workdir = Path(_require(_WORKDIR, "workdir", "review"))
    server, url = review_server.serve_review(workdir, _require(_ROUND, "round", "review"), port=_PORT.value)
    print(f"Review page: {url}  (Ctrl-C when saved)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.shutdown()


def _cmd_bench(args):
    from gal_jax import bench

    if len(args) < 3 or args[2] not in BENCH_TARGETS:
        raise UsageError(f"`gal-jax bench` takes one of {', '.join(BENCH_TARGETS)}")
    config = _config("bench")
    if config.bench.iters < 1 or config.bench.warmup < 0:
        raise UsageError(f"config.bench.iters={config.bench.iters} must be >= 1 and "
                         f"config.bench.warmup={config.bench.warmup} >= 0")
    bench.run(args[2], config)


HANDLERS = {
    "run": _cmd_run,
    "export": _cmd_export,
    "sample": _cmd_sample,
    "make-tiny": _cmd_make_tiny,
    "evaluate": _cmd_evaluate,
    "review": _cmd_review,
    "bench": _cmd_bench,
}


def _command(argv) -> str:
    return argv[1] if len(argv) > 1 and argv[1] in HANDLERS else "<command>"


def _fail(command: str, message: str, code: int):
    """Prints the one-line error (first line of the message, rest indented) and exits with `code`."""
    first, *rest = str(message).strip().splitlines() or [""]
    lines = [f"gal-jax {command}: error: {first}", *("  " + line.strip() for line in rest if line.strip())]
    print("\n".join(lines), file=sys.stderr)
    sys.exit(code)


def main(argv):
    command = _command(argv)
    debug = flags.FLAGS.verbosity >= 1  # --verbosity=1: absl/orbax logs and full tracebacks
    if not debug:
        # absl INFO is orbax's and TFDS's chatter; our progress is printed by the progress bars.
        logging.set_verbosity(logging.WARNING)
        std_logging.getLogger("absl").addFilter(_drop_known_noise)
    from gal_jax.workdir import AwaitingHumanFeedback  # light: `review` must not import JAX

    try:
        if command not in HANDLERS:
            raise UsageError(f"usage: gal-jax {{{'|'.join(COMMANDS)}}} [flags]; see `gal-jax --help`")
        if _DISTRIBUTED.value:
            import jax

            jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        HANDLERS[command](argv)
    except AwaitingHumanFeedback as waiting:
        print(waiting)
        sys.exit(EXIT_AWAITING_FEEDBACK)
    except KeyboardInterrupt:
        print(f"gal-jax {command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # every error ends as one line; --verbosity=1 shows where it came from
        if debug:
            raise
        _fail(command, *_describe(err))


def _drop_known_noise(record: std_logging.LogRecord) -> bool:
    """Returns False for log lines that say nothing to our users (TFDS's OpenCV advice: we read
    images with PIL on purpose)."""
    return not record.getMessage().startswith("OpenCV is not installed")


def _describe(err: Exception) -> tuple[str, int]:
    """Returns (message, exit code) for an error: the user's mistakes by their message, bugs as such."""
    if isinstance(err, UsageError):
        return str(err), EXIT_USAGE
    if isinstance(err, (ValueError, OSError)):
        return str(err), EXIT_ERROR
    where = traceback.extract_tb(err.__traceback__)[-1]
    return (f"internal error {type(err).__name__}: {err} (at {Path(where.filename).name}:{where.lineno}; "
            "rerun with --verbosity=1 for the traceback, and please report it)"), EXIT_ERROR


# Commands that run PyTorch in-process (`bench`: the diffusers references of --compare-torch and
# --authors) need transformers to know PyTorch; the others take only the CLIP tokenizer from it.
COMMANDS_WITH_TORCH = ("bench",)


def tokenizer_only_environ(argv, environ=os.environ) -> bool:
    """Sets USE_TORCH=0 in `environ` for a command that takes only the tokenizer from transformers,
    and returns whether it did: transformers then skips importing PyTorch (about 2 s on a 2-core
    host, of its 3.5 s import). A USE_TORCH already set (the user's) is kept."""
    if _command(argv) in COMMANDS_WITH_TORCH or "USE_TORCH" in environ or "transformers" in sys.modules:
        return False
    environ["USE_TORCH"] = "0"
    return True


def run():
    """Console-script entry point."""
    from gal_jax import host_malloc

    host_malloc.set_up()  # before jax starts its threads; one arena where the compile cache is warm
    # In this process only (the entry point, not main(), which tests call in-process next to
    # PyTorch references): no command here spawns Python processes that would inherit it.
    tokenizer_only_environ(sys.argv)
    if any(arg in ("-h", "-help", "--help") for arg in sys.argv[1:]):
        # absl's --help lists the flags of the __main__ module: the console-script wrapper has none.
        print(__doc__)
        print(flags.FLAGS.module_help(__name__))
        return
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
    """Returns the arguments left after absl parses the flags; a bad flag exits 2 with one line."""
    # Accept --num-per-prompt as well as --num_per_prompt: diffusers-style spelling.
    argv = [a.replace("--num-per-prompt", "--num_per_prompt") for a in argv]
    command = _command(argv)
    try:
        _check_config_file(argv)
        return flags.FLAGS(argv)
    except UsageError as err:
        _fail(command, str(err), EXIT_USAGE)
    except flags.Error as err:
        _fail(command, _flag_error(err, argv), EXIT_USAGE)
    except (AttributeError, KeyError) as err:  # ml_collections, for a field under a repeated --config
        unknown = [_unknown_config_field(a.split("=", 1)[0][2:], _config_argument(argv))
                   for a in argv if a.startswith("--config.")]
        _fail(command, next((u for u in unknown if u), " ".join(str(err).split())), EXIT_USAGE)


def _config_argument(argv) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return values[-1] if values else None


def _check_config_file(argv) -> None:
    """Raises UsageError naming the --config file when it is missing or does not import.

    ml_collections defers such errors to the first use of the config, with a message that does
    not say what went wrong.
    """
    value = _config_argument(argv)
    if value is None:
        return
    path, _, variant = value.partition(":")
    if not Path(path).is_file():
        raise UsageError(f"--config={value}: no such file {path!r}")
    try:
        module = _load_config_module(path)
        if not hasattr(module, "get_config"):
            raise UsageError(f"--config={value}: {path} has no get_config()")
        module.get_config(*([variant] if variant else []))
    except UsageError:
        raise
    except SyntaxError as err:
        raise UsageError(f"--config={value}: {path}:{err.lineno}: does not import ({err.msg})") from None
    except Exception as err:  # the user's config code can raise anything
        raise UsageError(f"--config={value}: {type(err).__name__}: {err}") from None


def _load_config_module(path: str):
    """Returns the config file at `path` imported as a module (any file name, as ml_collections)."""
    loader = importlib.machinery.SourceFileLoader("gal_jax_config_check", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def _flag_error(err: flags.Error, argv) -> str:
    """Returns absl's flag error as one line, with a "did you mean" for an unknown config field."""
    if isinstance(err, flags.UnrecognizedFlagError) and str(err.flagname).startswith("config."):
        return _unknown_config_field(str(err.flagname), _config_argument(argv)) or str(err)
    if isinstance(err, flags.UnrecognizedFlagError):
        known = [name for name in flags.FLAGS if not name.startswith("config.")]
        close = difflib.get_close_matches(str(err.flagname), known, n=1)
        return f"unknown flag --{err.flagname}" + (f"; did you mean --{close[0]}?" if close else "")
    return " ".join(str(err).split())


def _unknown_config_field(dotted: str, config_argument: str | None) -> str | None:
    """Returns "unknown config field --config.x.z; did you mean --config.x.y? (...)" when `dotted`
    is not a field of the config, else None."""
    if config_argument is None:
        return f"--{dotted} needs a --config before it"
    path, _, variant = config_argument.partition(":")
    config = _load_config_module(path).get_config(*([variant] if variant else []))
    node, names = config, dotted.split(".")[1:]
    for depth, name in enumerate(names):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if name not in keys:
            close = difflib.get_close_matches(name, keys, n=1)
            known = ", ".join(sorted(keys))
            hint = f"; did you mean --config.{'.'.join([*names[:depth], close[0]])}?" if close else ""
            section = "config" + "".join(f".{n}" for n in names[:depth])
            return f"unknown config field --{dotted}{hint} (fields of {section}: {known})"
        node = node[name]
    return None


if __name__ == "__main__":
    sys.exit(run())
