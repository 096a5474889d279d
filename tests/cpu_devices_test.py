"""The host's CPU split into JAX devices (gal_jax/cpu_devices.py) and training on part of the mesh
(config.mesh.train_devices)."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import pytest
from jax._src import xla_bridge

from gal_jax import cpu_devices, sharding

ROOT = Path(__file__).parents[1]
FLAG = cpu_devices.FLAG


@pytest.fixture
def fresh_backend(monkeypatch):
    """As if the backend had not started yet (it has, in the test process)."""
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)


@pytest.mark.parametrize("count, cores, expected", [(-1, 3, 3), (4, 3, 4), (2, 1, 2)])
def test_a_cpu_run_gets_the_devices_asked_for_or_one_per_core(count, cores, expected, fresh_backend, monkeypatch):
    monkeypatch.setattr(cpu_devices, "usable_cores", lambda: cores)
    environ = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert cpu_devices.split_host_cpu(count, environ) == expected
    assert environ["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {FLAG}={expected}"


@pytest.mark.parametrize("count, environ", [
    (0, {"JAX_PLATFORMS": "cpu"}),  # the default: XLA's one device
    (1, {"JAX_PLATFORMS": "cpu"}),
    (-1, {"JAX_PLATFORMS": "cuda"}),  # an accelerator: its host CPU is not where the work runs
    (4, {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{FLAG}=8"}),  # the user's (or the tests') own split wins
])
def test_nothing_changes_where_the_split_does_not_apply(count, environ, fresh_backend, monkeypatch):
    monkeypatch.setattr(cpu_devices, "usable_cores", lambda: 4)
    before = dict(environ)
    assert cpu_devices.split_host_cpu(count, environ) is None
    assert environ == before


def test_a_started_backend_is_left_alone_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    environ = {"JAX_PLATFORMS": "cpu"}
    assert cpu_devices.split_host_cpu(2, environ) is None
    assert "XLA_FLAGS" not in environ
    assert "config.mesh.cpu_devices=2 ignored" in caplog.text


@pytest.mark.parametrize("value", [-2, 1.5, True, "2", None])
def test_a_bad_count_is_named(value):
    with pytest.raises(ValueError, match=re.escape(f"config.mesh.cpu_devices={value!r}: expected 0")):
        cpu_devices.check_count(value)


def test_a_fresh_process_starts_with_the_devices_set():
    """The real thing: XLA reads the flag when the backend starts, after `import jax`."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    code = textwrap.dedent("""
        import jax
        from gal_jax import cpu_devices
        print(cpu_devices.split_host_cpu(3), jax.device_count())
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.split() == ["3", "3"]


# ---------------------------------------------------------------------------------------------
# Training on the first devices of the mesh


def mesh_config(**fields):
    return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "rules": None, **fields})


@pytest.mark.parametrize("fields, shape", [
    ({"train_devices": 2}, {"data": 2, "fsdp": 1, "tensor": 1}),
    ({"train_devices": 1}, {"data": 1, "fsdp": 1, "tensor": 1}),
    ({"train_devices": 4, "fsdp": 2}, {"data": 2, "fsdp": 2, "tensor": 1}),
    ({"train_devices": 4, "data": 1, "fsdp": -1}, {"data": 1, "fsdp": 4, "tensor": 1}),
    ({"train_devices": 4, "tensor": 2}, {"data": 2, "fsdp": 1, "tensor": 2}),
])
def test_the_train_mesh_is_the_first_devices_with_the_configs_fsdp_and_tensor(fields, shape):
    config = mesh_config(**fields)
    mesh = sharding.mesh_from_config(config)
    train = sharding.train_mesh_from_config(config, mesh)
    assert dict(train.shape) == shape
    assert [d.id for d in train.devices.flat] == [d.id for d in list(mesh.devices.flat)[:fields["train_devices"]]]


@pytest.mark.parametrize("count", [0, 8])
def test_the_whole_mesh_trains_by_default(count):
    config = mesh_config(train_devices=count)
    mesh = sharding.mesh_from_config(config)
    assert sharding.train_mesh_from_config(config, mesh) is mesh
    legacy = mesh_config()  # a config written before train_devices existed
    assert sharding.train_mesh_from_config(legacy, mesh) is mesh


@pytest.mark.parametrize("fields, message", [
    ({"train_devices": -1}, "mesh.train_devices=-1: expected 0 (the whole mesh) or a number of devices"),
    ({"train_devices": 1.0}, "mesh.train_devices=1.0: expected 0"),
    ({"train_devices": 9}, "mesh.train_devices=9: the mesh has only 8 devices"),
    ({"train_devices": 3, "fsdp": 2}, "mesh.train_devices=3 is not a multiple of mesh.fsdp x mesh.tensor = 2"),
])
def test_a_train_device_count_that_cannot_work_is_named(fields, message):
    config = mesh_config(**fields)
    with pytest.raises(ValueError, match=re.escape(message)):
        sharding.train_mesh_from_config(config, sharding.mesh_from_config(config))
