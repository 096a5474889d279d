"""The transfer guard on CPU behaves as on a device (conftest's fixture), and saving obeys it."""

import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gal_jax import checkpoint, sharding

REFUSED = "Disallowed device-to-host transfer"

IMPLICIT_COPIES = {
    "np.asarray": np.asarray,
    "np.array": np.array,
    "numpy ufunc": np.isfinite,
    "float": float,
    "bool": bool,
    "tolist": lambda x: x.tolist(),
    "repr": repr,
    "copy_to_host_async": lambda x: x.copy_to_host_async(),
}


@pytest.mark.parametrize("copy", IMPLICIT_COPIES.values(), ids=IMPLICIT_COPIES.keys())
def test_implicit_copy_of_a_cpu_array_is_refused_under_the_guard(copy):
    x = jnp.array(3.0)
    with jax.transfer_guard("disallow"), pytest.raises(jax.errors.JaxRuntimeError, match=REFUSED):
        copy(x)
    copy(x)  # allowed outside the guard


def test_shards_of_a_sharded_array_are_guarded():
    mesh = sharding.make_mesh(8, 1)
    x = jax.device_put(jnp.arange(16.0), sharding.batch_sharding(mesh))
    with jax.transfer_guard_device_to_host("disallow"):
        with pytest.raises(jax.errors.JaxRuntimeError, match=REFUSED):
            np.asarray(x)
        with pytest.raises(jax.errors.JaxRuntimeError, match=REFUSED):
            np.asarray(x.addressable_shards[3].data)


def test_device_get_is_allowed_and_its_copy_is_kept_as_on_a_device():
    x = jnp.arange(4.0)
    with jax.transfer_guard("disallow"):
        np.testing.assert_array_equal(jax.device_get(x), [0, 1, 2, 3])
        # A device array keeps its host copy: converting it again transfers nothing.
        assert np.asarray(x).tolist() == [0, 1, 2, 3]
        # x * x is a new array on the device, never copied.
        with pytest.raises(jax.errors.JaxRuntimeError, match=REFUSED):
            np.asarray(x * x)


def test_disallow_explicit_refuses_device_get_too():
    x = jnp.arange(4.0)
    with jax.transfer_guard("disallow_explicit"):
        with pytest.raises(jax.errors.JaxRuntimeError, match=REFUSED):
            jax.device_get(x)


def test_the_guard_is_thread_local():
    x, copied = jnp.arange(4.0), []
    with jax.transfer_guard("disallow"):
        worker = threading.Thread(target=lambda: copied.append(np.asarray(x)))
        worker.start()
        worker.join()
    np.testing.assert_array_equal(copied[0], [0, 1, 2, 3])


def test_implicit_host_to_device_copy_is_refused_without_help():
    # XLA guards host-to-device copies on CPU too: the fixture leaves them alone.
    with jax.transfer_guard("disallow"):
        with pytest.raises(jax.errors.JaxRuntimeError, match="Disallowed host-to-device transfer"):
            jnp.asarray(np.ones(3))
        jax.device_put(np.ones(3))


# ---------------------------------------------------------------------------------------------
# Saving inside the train loop's guard


def small_state():
    return {"kernel": jnp.arange(12.0).reshape(3, 4), "step": jnp.array(5)}


def test_orbax_copies_to_the_host_on_the_saving_thread(tmp_path):
    # Synchronous: a failed async save leaves orbax threads waiting minutes for their signals.
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(tmp_path, options=options, item_names=("state",))
    save = ocp.args.Composite(state=ocp.args.StandardSave(small_state()))
    with jax.transfer_guard("disallow"), pytest.raises(jax.errors.JaxRuntimeError, match=REFUSED):
        manager.save(1, args=save)
    manager.close()


def test_checkpointer_saves_inside_a_disallowing_guard(tmp_path):
    state = small_state()
    with checkpoint.Checkpointer(tmp_path) as ckpt, jax.transfer_guard("disallow"):
        ckpt.save(1, state, metadata={})
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        chex.assert_trees_all_equal(ckpt.restore(abstract).state, state)
