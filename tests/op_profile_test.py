"""Where the time goes: HLO instructions classified by kind and layer, trace times summed per group,
and the benchmarks' optional profile figures."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import tiny_cpu
from gal_jax import bench, op_profile


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (3, 3), name="conv1")(x)
        x = nn.LayerNorm(name="norm1")(x)
        return nn.Dense(8, name="proj")(x)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(_Block(name="blocks_0")(x))


def _compiled_loss_grad():
    net = _Net()
    x = jnp.ones((4, 16, 16, 3))
    params = net.init(jax.random.key(0), x)
    loss = lambda p, x: jnp.mean(jnp.square(net.apply(p, x)))
    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    return compiled, lambda: compiled(params, x)


def test_layer_of_names_the_innermost_module_and_the_pass():
    assert op_profile.layer_of(
        "jit(f)/transpose(jvp(UNet2DConditionModel))/up_blocks_1/attentions_0/transformer_blocks_0/attn1/while/body/closed_call/dot_general"
    ) == ("attn1", True)
    assert op_profile.layer_of("jit(f)/UNet2DConditionModel/down_blocks_0/resnets_1/conv_general_dilated") == ("resnets", False)
    assert op_profile.layer_of("jit(f)/add") == ("(top level)", False)


def test_parse_hlo_classifies_fusions_by_their_heaviest_op_and_keeps_their_layer():
    compiled, _ = _compiled_loss_grad()
    instructions = op_profile.parse_hlo(compiled.as_text())
    kinds = {(info.kind, info.layer, info.backward) for info in instructions.values()}
    assert ("convolution", "conv1", False) in kinds
    assert ("matmul", "proj", False) in kinds
    assert any(kind == "matmul" and layer == "proj" and backward for kind, layer, backward in kinds)
    assert any(kind == "reduction" and layer == "norm1" for kind, layer, _ in kinds)
    # Fusion bodies are not executed as units: their inner ops are not instructions of their own.
    assert all(not name.startswith("param_") for name in instructions)


def test_profile_sums_traced_op_time_into_shares_by_kind_layer_and_pass():
    compiled, call = _compiled_loss_grad()
    result = op_profile.profile(compiled, call, iters=2, top=4)
    assert result["op_seconds_per_call"] > 0
    for group in ("by_kind_pct", "by_pass_pct"):
        assert sum(result[group].values()) == pytest.approx(100, abs=0.5), result[group]
    assert set(result["by_kind_pct"]) <= set(op_profile.KINDS)
    assert "convolution" in result["by_kind_pct"] and set(result["by_pass_pct"]) == {"forward", "backward"}
    assert len(result["top_ops"]) == 4 and all(op["ms"] > 0 for op in result["top_ops"])
    assert result["top_ops"][0]["ms"] >= result["top_ops"][-1]["ms"]


def test_breakdown_leaves_out_control_flow_and_names_ops_of_other_modules():
    instructions = {
        "while.1": op_profile.Instruction("while", "control", "loop", False),
        "dot.1": op_profile.Instruction("dot", "matmul", "attn1", False),
        "conv.1": op_profile.Instruction("convolution", "convolution", "conv1", True),
    }
    result = op_profile.breakdown({"while.1": 9.0, "dot.1": 0.3, "conv.1": 0.6, "elsewhere.3": 0.1}, instructions)
    assert result["op_seconds_per_call"] == pytest.approx(1.0)
    assert result["by_kind_pct"] == {"convolution": 60.0, "matmul": 30.0, "other": 10.0}
    assert result["by_pass_pct"] == {"backward": 60.0, "forward": 40.0}
    assert result["by_layer_pct"]["(not in this module)"] == 10.0
    figures = op_profile.flat_figures("profile", result)
    assert figures["profile.by_kind.convolution"] == "60.0%"
    assert figures["profile.top1"].startswith("600.0 ms: conv.1")


@pytest.mark.parametrize("target", ["train", "sample", "score"])
def test_benchmarks_time_the_loop_functions_and_add_a_profile_on_request(target, tiny_models, tmp_path):
    config = tiny_cpu.get_config()
    config.model.sd_path, config.model.clip_path = str(tiny_models["sd"]), str(tiny_models["clip"])
    config.sample.steps, config.sample.max_images_per_device = 2, 1
    config.train.batch_size = 4  # with prior rows: one per device of the 8
    config.bench.iters, config.bench.warmup, config.bench.profile = 1, 0, True
    config.bench.out = str(tmp_path / "bench.json")
    result = bench.run(target, config)
    assert result["benchmark"] == target and result["step_s_median"] > 0
    assert result["tflop_per_step"] > 0
    shares = [float(v.rstrip("%")) for k, v in result.items() if k.startswith("profile.by_kind.")]
    assert shares and sum(shares) == pytest.approx(100, abs=0.5), result
    assert "profile.top1" in result and (tmp_path / "bench.json").exists()


def test_bench_all_times_the_loop_functions_and_a_round_split_by_phase_beside_its_flops(tiny_assets):
    from driver_test import small_config

    everything = bench.run("all", small_config(tiny_assets))
    assert everything["benchmark"] == "all" and everything["device"] == "8 x cpu"
    assert all(everything[f"{name}.step_s_median"] > 0 for name in ("train", "sample", "score"))
    result = {key.removeprefix("round."): value for key, value in everything.items() if key.startswith("round.")}
    assert result["round"] == 1 and result["train_steps"] == 3 and result["images"] > 0
    phases = ("train", "generate", "write", "score")
    assert all(result[f"{phase}_s"] > 0 for phase in phases)
    assert result["round_s"] == pytest.approx(sum(result[f"{phase}_s"] for phase in phases), abs=0.02)
    for phase in ("train", "generate", "score"):
        assert result[f"{phase}_tflop"] > 0
        assert result[f"{phase}_tflop_per_s"] == pytest.approx(result[f"{phase}_tflop"] / result[f"{phase}_s"], rel=0.01)
    assert result["floor"].startswith("n/a")  # no peak is known for a CPU


def test_phase_floors_are_the_work_over_the_peak():
    timings = {"train": 4.0, "generate": 2.0, "write": 0.5, "score": 0.5}
    work = {"train": 8e12, "generate": 1e12, "score": 1e11, "write": 0.0}
    result = bench.phase_figures(timings, work, peak=1e12)
    assert result["train_floor_s"] == 8.0 and result["train_vs_floor"] == 0.5
    assert result["round_floor_s"] == 9.1 and result["round_vs_floor"] == round(7.0 / 9.1, 1)
    assert "write_floor_s" not in result and result["write_s"] == 0.5


def test_a_round_of_random_sd15_weights_is_skipped_with_the_reason():
    config = tiny_cpu.get_config()
    config.bench.model = "sd15"
    result = bench.bench_round(config, mesh=None)
    assert "random weights" in result["skipped"]
