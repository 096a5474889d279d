"""Test set-up: 8 fake CPU devices, set before anything imports jax; CPU arrays obey the
transfer guard as device arrays do."""

import ctypes
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from gal_jax import host_malloc  # noqa: E402

host_malloc.set_up(compiles=True)  # before jax starts its threads; the tests keep no compile cache

# A worker's peak resident memory: 8 fake devices, the tiny models, a GAL run in a subprocess.
WORKER_MEMORY_BYTES = 6 * 2**30
MAX_WORKERS = 4


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: unknown where it is absent or off
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pytest.ini): one worker per core, as many as memory allows, at most MAX_WORKERS;
    one where the tests run on an accelerator (JAX_PLATFORMS=cuda...), which workers would share.

    XLA's CPU compiles, most of this suite's time, run on one thread, so a second process keeps
    the second core busy; beyond a few workers each one's copy of the session fixtures costs more
    than it saves."""
    if os.environ["JAX_PLATFORMS"] != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = WORKER_MEMORY_BYTES
    return max(1, min(cores, memory // WORKER_MEMORY_BYTES, MAX_WORKERS))


# The files that take minutes (GAL runs in subprocesses, kills and resumes), in descending time:
# dealt out first under `-n`, so that no worker is left with one of them after the others are done.
RUN_FIRST = ("driver_test.py", "methods_run_test.py", "main_test.py", "crash_test.py",
             "personalize_test.py", "tiny_train_test.py", "sdxl_test.py", "op_profile_test.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(RUN_FIRST)))  # stable: in-file order kept


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Paths of a tiny SD pipeline folder and a tiny CLIP folder, written once per test session."""
    from gal_jax import tiny

    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "sd": tiny.write_tiny_stable_diffusion(root / "sd"),
        "clip": tiny.write_tiny_clip(root / "clip"),
    }


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """Paths of a random-init tiny default (models and concept data), built by make_tiny: fast
    models whose judgments are arbitrary, for tests of the machinery."""
    from gal_jax import tiny

    return tiny.make_tiny(tmp_path_factory.mktemp("tiny_assets"), trained=False)


@pytest.fixture(scope="session")
def tiny_world_assets(tmp_path_factory) -> dict[str, Path]:
    """Paths of the tiny world default (config.model.tiny_world): the shipped trained models and
    the tiny world's concepts."""
    from gal_jax import tiny

    return tiny.make_tiny(tmp_path_factory.mktemp("tiny_world_assets"), trained=True)


@pytest.fixture(scope="session")
def loaded_sd(tiny_models):
    """(StableDiffusion, params) of the tiny SD, loaded once per session; tests must not mutate it."""
    from gal_jax import models

    return models.load_stable_diffusion(tiny_models["sd"])


@pytest.fixture(scope="session")
def loaded_clip(tiny_models):
    """(ClipModel, params) of the tiny CLIP, loaded once per session; tests must not mutate it."""
    from gal_jax import models

    return models.load_clip(tiny_models["clip"])


# ---------------------------------------------------------------------------------------------
# The transfer guard, as a device applies it
#
# XLA does not guard device-to-host copies of CPU arrays (jax issue #16602): an implicit
# np.asarray(x) or float(x) inside jax.transfer_guard("disallow") passes here and raises on a GPU
# or TPU. This fixture makes CPU arrays obey the guard as device arrays do, so those bugs fail in
# these tests. Host-to-device copies need nothing: XLA guards them on CPU too.

_HOST_COPY_MADE = "_gal_test_host_copy_made"
_WORD = ctypes.sizeof(ctypes.c_void_p)


def _device_to_host_refused() -> bool:
    """Returns whether this thread's guard refuses a device-to-host copy now (XLA's rule)."""
    from jax._src.lib import guard_lib

    local, levels = guard_lib.thread_local_state(), guard_lib.TransferGuardLevel
    level = local.device_to_host
    if level is None:
        level = guard_lib.global_state().device_to_host
    if level == levels.DISALLOW_EXPLICIT:
        return True
    return level == levels.DISALLOW and not local.explicit_device_get


def _check_host_copy(array) -> None:
    """Raises as XLA does on a device when copying `array` to the host is refused.

    A device array keeps its first host copy and never guards again (XLA caches the host value);
    the mark set here stands in for that cache.
    """
    array._check_if_deleted()
    if getattr(array, _HOST_COPY_MADE, False) or array._npy_value is not None:
        return
    if _device_to_host_refused():
        import jax

        raise jax.errors.JaxRuntimeError(
            f"INVALID_ARGUMENT: Disallowed device-to-host transfer: shape={array.shape}, "
            f"dtype={array.dtype} (a CPU array, guarded as on a device by tests/conftest.py)"
        )
    setattr(array, _HOST_COPY_MADE, True)


def _getbuffer_slot(cls) -> ctypes.c_void_p:
    """Returns the bf_getbuffer field of a C type, after checking the PyTypeObject layout."""
    address = id(cls)
    name = ctypes.c_char_p(ctypes.c_void_p.from_address(address + 3 * _WORD).value).value
    basicsize = ctypes.c_ssize_t.from_address(address + 4 * _WORD).value
    if name.decode().rsplit(".", 1)[-1] != cls.__name__ or basicsize != cls.__basicsize__:
        raise RuntimeError(f"unexpected PyTypeObject layout: cannot reach {cls}'s buffer protocol")
    buffer_procs = ctypes.c_void_p.from_address(address + 20 * _WORD).value  # tp_as_buffer
    if not buffer_procs:
        raise RuntimeError(f"{cls} has no buffer protocol to hide")
    return ctypes.c_void_p.from_address(buffer_procs)


@pytest.fixture(scope="session", autouse=True)
def device_transfer_guard_on_cpu():
    """Makes implicit device-to-host copies of CPU arrays obey jax.transfer_guard, as on a GPU.

    Every implicit copy funnels into ArrayImpl._value (np.asarray via __array__, float, int, bool,
    tolist, repr, ...) or copy_to_host_async (orbax's save), both Python: they get the guard's
    check. numpy would bypass __array__ through the buffer protocol, which a CPU array exports
    (zero copy) and a device array does not: it is hidden for the session, as on a device.
    jax.device_get stays allowed under "disallow": it marks its copy explicit, which the check
    reads. The guard is thread-local: a copy on another thread obeys that thread's guard.
    """
    import jax
    from jax._src.array import ArrayImpl

    if jax.default_backend() != "cpu":  # a real device guards itself
        yield
        return
    value, copy_to_host_async = ArrayImpl.__dict__["_value"], ArrayImpl.copy_to_host_async

    def guarded_value(self):
        _check_host_copy(self)
        return value.fget(self)

    def guarded_copy_to_host_async(self):
        _check_host_copy(self)
        return copy_to_host_async(self)

    getbuffer = _getbuffer_slot(ArrayImpl)
    exported = getbuffer.value
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ArrayImpl, "_value", property(guarded_value))
        patch.setattr(ArrayImpl, "copy_to_host_async", guarded_copy_to_host_async)
        getbuffer.value = None
        try:
            yield
        finally:
            getbuffer.value = exported


@pytest.fixture(scope="session")
def loaded_default_sd(tiny_assets):
    """(StableDiffusion, params) of the tiny default's SD (tiny_assets), loaded once per session;
    tests must not mutate it."""
    from gal_jax import models

    return models.load_stable_diffusion(tiny_assets["sd"])
