"""Orbax checkpoints: a sharded train state round-trips; a killed round resumes where it stopped."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from configs import tiny_cpu
from gal_jax import checkpoint, data, models, sharding, train, trainer as trainer_lib


LOGICAL_AXES = {"dense": {"kernel": P("embed", "mlp"), "bias": P("mlp")}}


def small_state(mesh, rules=sharding.DEFAULT_LOGICAL_RULES):
    params = {"dense": {"kernel": jnp.arange(64 * 512, dtype=jnp.float32).reshape(64, 512), "bias": jnp.ones(512)}}
    optimizer = optax.adamw(1e-3)
    return params, optimizer, train.init_train_state(params, optimizer, mesh, LOGICAL_AXES, rules)


def test_sharded_state_round_trips_with_its_shardings(tmp_path):
    mesh = sharding.make_mesh(4, 2)
    params, optimizer, state = small_state(mesh)
    state = state.replace(step=state.step + 7)
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(7, state, metadata={"total_steps": 10})
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        restored = ckpt.restore(train.abstract_train_state(params, optimizer, mesh, LOGICAL_AXES))
    assert restored.step == 7 and restored.metadata == {"total_steps": 10, "step": 7}
    assert isinstance(restored.state, train.TrainState)
    chex.assert_trees_all_equal(jax.device_get(restored.state), jax.device_get(state))
    for leaf, original in zip(jax.tree_util.tree_leaves(restored.state), jax.tree_util.tree_leaves(state)):
        assert leaf.sharding.is_equivalent_to(original.sharding, leaf.ndim)
    assert "fsdp" in restored.state.params["dense"]["kernel"].sharding.spec


def test_saving_replicated_arrays_in_one_process_compiles_nothing(tmp_path):
    # Orbax's replica-parallel saving slices each replicated array between its replicas, with a
    # jitted slice per array shape; in one process every replica is local and that buys nothing.
    from gal_jax import io_utils

    mesh = sharding.make_mesh(8, 1)  # replicated over 8 devices
    params, optimizer, state = small_state(mesh)
    built = len(io_utils.executables_built())
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, metadata={})
    assert io_utils.executables_built()[built:] == []
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        restored = ckpt.restore(train.abstract_train_state(params, optimizer, mesh, LOGICAL_AXES))
    chex.assert_trees_all_equal(jax.device_get(restored.state), jax.device_get(state))


def test_a_checkpoint_from_a_two_axis_mesh_restores_onto_three_axis_meshes(tmp_path):
    """Checkpoints written before the 'tensor' axis existed (a ('data', 'fsdp') mesh) restore onto
    a tensor=1 mesh with the same layout, and onto a tensor mesh resharded."""
    two_axis = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    params, optimizer, state = small_state(two_axis, rules=(("embed", "fsdp"), ("mlp", "fsdp")))
    assert state.params["dense"]["kernel"].sharding.spec == P("fsdp", None)
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, state, metadata={})
    for shape in ((4, 2, 1), (2, 2, 2)):
        mesh = sharding.make_mesh(*shape)
        with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
            restored = ckpt.restore(train.abstract_train_state(params, optimizer, mesh, LOGICAL_AXES)).state
        chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
        if shape[2] == 1:
            for leaf, original in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
                assert leaf.sharding.spec == original.sharding.spec
                assert leaf.sharding.is_equivalent_to(original.sharding, leaf.ndim)
        else:
            assert restored.params["dense"]["kernel"].sharding.spec == P("fsdp", "tensor")
            assert restored.opt_state[0].mu["dense"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_only_the_last_checkpoints_are_kept(tmp_path):
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    _, _, state = small_state(mesh)
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (2, 4, 6):
            ckpt.save(step, state, metadata={})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6


def test_restoring_an_empty_folder_names_it(tmp_path):
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    params, optimizer, _ = small_state(mesh)
    with checkpoint.Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(checkpoint.CheckpointError, match="empty: no checkpoint to restore"):
            ckpt.restore(train.abstract_train_state(params, optimizer, mesh, LOGICAL_AXES))


# ---------------------------------------------------------------------------------------------
# A round killed mid-way


class Killed(Exception):
    """Stands in for the process being killed right after a checkpoint was written."""


def die_after_saving(monkeypatch, when) -> None:
    """Makes Checkpointer.save raise Killed right after the save for which when(checkpointer,
    step) holds (undo with monkeypatch.undo())."""
    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, state, **kwargs):
        save(self, step, state, **kwargs)
        if when(self, step):
            raise Killed

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_die)


@pytest.fixture(scope="module")
def round_setup(tiny_assets, tmp_path_factory):
    sd, params = models.load_stable_diffusion(tiny_assets["sd"])
    train_set = data.write_training_set(
        data.load_concept(tiny_assets["object_concept"]),
        data.list_class_images(tiny_assets["reg_dir"]),
        "a teapot",
        tmp_path_factory.mktemp("ckpt_train_set") / "set",
        sd.tokenize,
        64,
    )
    config = tiny_cpu.get_config()
    config.train.update(steps=6, batch_size=1, checkpoint_every=2, keep_checkpoints=2, log_every=2)
    trainer = trainer_lib.Trainer(config, sd, sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
    return trainer, params, train_set


@pytest.fixture(scope="module")
def finished_run(round_setup, tmp_path_factory):
    trainer, params, train_set = round_setup
    directory = tmp_path_factory.mktemp("finished") / "checkpoints"
    trained, metrics = trainer.train_round(params, train_set, directory, progress=False)
    trained = trained.unet
    return directory, trained, metrics


def test_killed_round_resumes_at_the_same_step_with_identical_params(round_setup, finished_run, tmp_path, monkeypatch):
    trainer, params, train_set = round_setup
    _, uninterrupted, _ = finished_run
    base = jax.device_get(params.unet)
    die_after_saving(monkeypatch, lambda _, step: step == 4)
    with pytest.raises(Killed):
        trainer.train_round(params, train_set, tmp_path / "killed", progress=False)
    monkeypatch.undo()

    resumed, metrics = trainer.train_round(params, train_set, tmp_path / "killed", progress=False)
    resumed = resumed.unet
    assert metrics["start_step"] == 4 and [h["step"] for h in metrics["history"]] == [6]
    # The loss curve survives the kill: the checkpoints carry the part before it.
    assert metrics["loss_curve"] == finished_run[2]["loss_curve"]
    assert [p["step"] for p in metrics["loss_curve"]] == [2, 4, 6]
    chex.assert_trees_all_equal(jax.device_get(resumed), jax.device_get(uninterrupted))
    with checkpoint.Checkpointer(tmp_path / "killed") as ckpt:
        assert ckpt.all_steps() == [4, 6]
    chex.assert_trees_all_equal(jax.device_get(params.unet), base)
    assert trainer.num_compiles == 1


def test_finished_round_returns_its_last_checkpoint_without_training(round_setup, finished_run):
    trainer, params, train_set = round_setup
    directory, trained, first = finished_run
    again, metrics = trainer.train_round(params, train_set, directory, progress=False)
    again = again.unet
    assert metrics["start_step"] == 6 and metrics["history"] == []
    assert metrics["loss"] == pytest.approx(first["loss"])
    assert metrics["loss_curve"] == first["loss_curve"]
    chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(trained))


def test_checkpoint_of_a_different_run_length_is_refused(round_setup, finished_run):
    trainer, params, train_set = round_setup
    directory, _, _ = finished_run
    config = tiny_cpu.get_config()
    config.train.update(steps=8, batch_size=1)
    longer = trainer_lib.Trainer(config, trainer.sd, trainer.mesh)
    with pytest.raises(checkpoint.CheckpointError, match="run of 6 steps, this one has train.steps=8"):
        longer.train_round(params, train_set, directory, progress=False)
    with checkpoint.Checkpointer(directory) as ckpt:
        assert ckpt.all_steps() == [4, 6]


def test_without_a_final_checkpoint_a_kill_after_training_redoes_the_last_window(round_setup, finished_run, tmp_path):
    """The driver writes the round's UNet itself and deletes the checkpoints: the state after the
    last step is never saved (for SD 1.5 ~10 GB written to be deleted), so a kill before the UNet
    is written resumes from the last periodic checkpoint and ends at the same params."""
    trainer, params, train_set = round_setup
    _, uninterrupted, first = finished_run
    trained, _ = trainer.train_round(params, train_set, tmp_path / "c", progress=False, final_checkpoint=False)
    trained = trained.unet
    with checkpoint.Checkpointer(tmp_path / "c") as ckpt:
        assert ckpt.all_steps() == [2, 4], "step 6 is a multiple of checkpoint_every, yet skipped"
    chex.assert_trees_all_equal(jax.device_get(trained), jax.device_get(uninterrupted))
    # "Killed" after training: the rerun trains steps 5-6 again, from checkpoint 4.
    again, metrics = trainer.train_round(params, train_set, tmp_path / "c", progress=False, final_checkpoint=False)
    again = again.unet
    assert metrics["start_step"] == 4 and metrics["loss_curve"] == first["loss_curve"]
    chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(uninterrupted))
