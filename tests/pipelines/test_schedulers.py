"""Native schedulers against diffusers' (the oracle): schedules, step-by-step rollouts, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as ref_calculate_shift  # noqa: E402

from diffc.errors import CheckpointError, InvalidArgumentError  # noqa: E402
from diffc.models.registry import scheduler_class  # noqa: E402
from diffc.pipelines.schedulers import flow_match_euler, unipc  # noqa: E402
from diffc.pipelines.schedulers.flow_match_euler import FlowMatchEulerDiscreteScheduler, calculate_shift  # noqa: E402
from diffc.pipelines.schedulers.unipc import UniPCMultistepScheduler  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

STEP_COUNTS = (1, 2, 4, 28, 50)
# FLUX packed-latent sequence lengths: (h / 16) * (w / 16) for 256², 512², 768x1360, 1024².
FLUX_SEQ_LENS = (256, 1024, 48 * 85, 4096)
ROLLOUT_TOL = 1e-6
# Latent shapes: FLUX packed (batch, seq, 64); Wan (batch, channels, frames, height, width).
FLUX_LATENT = (1, 30, 64)
WAN_LATENT = (2, 4, 3, 5, 6)

EULER_CONFIGS = {
    "flux-dev": flow_match_euler.SCHEDULER_CONFIGS["flux.1-dev"],
    "flux-schnell": flow_match_euler.SCHEDULER_CONFIGS["flux.1-schnell"],
    "wan-shift7": flow_match_euler.SCHEDULER_CONFIGS["wan-tiny-test"],
    "shift-terminal": {"shift": 3.0, "shift_terminal": 0.1},
    "linear-time-shift": {"use_dynamic_shifting": True, "time_shift_type": "linear"},
    "karras": {"shift": 3.0, "use_karras_sigmas": True},
    "exponential": {"shift": 3.0, "use_exponential_sigmas": True},
}
WAN_UNIPC = {name: unipc.SCHEDULER_CONFIGS[f"wan2.1-{name}"] for name in ("480p", "720p")}


def _pair(native_cls, ref_cls, overrides):
    ref = ref_cls(**overrides)
    # Feed diffusers' full config (with _class_name, _diffusers_version, ...) as scheduler_config.json.
    return native_cls.from_config(dict(ref.config)), ref


def _assert_same_schedule(nat, ref):
    torch.testing.assert_close(nat.timesteps, ref.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(nat.sigmas, ref.sigmas, rtol=0, atol=0)


def _rollout(nat, ref, shape, sample_dtype, output_dtype, seed=0, last_step="compare"):
    """Step both schedulers through their timesteps with the same random outputs; compare each step.

    ``last_step``: "compare"; "ref-nan" (diffusers gives NaN there, diffc a finite value);
    "skip" (not taken: degenerate in diffusers too).
    """
    gen = torch.Generator().manual_seed(seed)
    x_ref = torch.randn(shape, generator=gen).to(sample_dtype)
    x_nat = x_ref.clone()
    outputs = []
    for i, t in enumerate(ref.timesteps):
        if i == len(ref.timesteps) - 1 and last_step == "skip":
            break
        model_output = torch.randn(shape, generator=gen).to(output_dtype)
        x_ref = ref.step(model_output, t, x_ref).prev_sample
        x_nat = nat.step(model_output, t, x_nat)
        assert x_nat.dtype == x_ref.dtype
        if i == len(ref.timesteps) - 1 and last_step == "ref-nan":
            assert torch.isnan(x_ref).any() and torch.isfinite(x_nat).all()
        else:
            assert rel_err(x_nat, x_ref) < ROLLOUT_TOL, f"step {i}"
        outputs.append(x_nat)
    return outputs


def test_calculate_shift_matches_flux():
    for seq_len in FLUX_SEQ_LENS + (1, 777):
        assert calculate_shift(seq_len) == ref_calculate_shift(seq_len)
        assert calculate_shift(seq_len, 128, 2048, 0.3, 1.2) == ref_calculate_shift(seq_len, 128, 2048, 0.3, 1.2)


def test_a_shift_whose_exponential_overflows_float32_is_refused_where_diffusers_goes_nan():
    """Just below the largest mu whose e^mu float32 holds the schedule is diffusers' bit for bit; just above, diffusers'
    sigmas are all NaN and diffc refuses mu by name."""
    from diffc.pipelines.schedulers.base import MAX_SHIFT_MU

    nat, ref = _pair(FlowMatchEulerDiscreteScheduler, diffusers.FlowMatchEulerDiscreteScheduler,
                     EULER_CONFIGS["flux-dev"])
    sigmas = np.linspace(1.0, 1 / 4, 4).tolist()
    below, above = MAX_SHIFT_MU - 0.01, MAX_SHIFT_MU + 0.01
    nat.set_timesteps(4, sigmas=sigmas, mu=below)
    ref.set_timesteps(4, sigmas=sigmas, mu=below)
    _assert_same_schedule(nat, ref)
    ref.set_timesteps(4, sigmas=sigmas, mu=above)
    assert torch.isnan(ref.sigmas[:-1]).all()
    with pytest.raises(InvalidArgumentError, match=r"^mu: is 88\.73; e\^mu overflows float32 above 88\.72"):
        nat.set_timesteps(4, sigmas=sigmas, mu=above)


def test_registry_resolves_native_schedulers():
    assert scheduler_class("FlowMatchEulerDiscreteScheduler") is FlowMatchEulerDiscreteScheduler
    assert scheduler_class("UniPCMultistepScheduler") is UniPCMultistepScheduler


@pytest.mark.parametrize("seq_len", FLUX_SEQ_LENS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_euler_flux_schedule(steps, seq_len):
    ref_cls = diffusers.FlowMatchEulerDiscreteScheduler
    nat, ref = _pair(FlowMatchEulerDiscreteScheduler, ref_cls, EULER_CONFIGS["flux-dev"])
    mu = calculate_shift(seq_len)
    sigmas = np.linspace(1.0, 1 / steps, steps)  # what FluxPipeline passes
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    nat.set_timesteps(steps, sigmas=sigmas.tolist(), mu=mu)
    _assert_same_schedule(nat, ref)
    ref.set_timesteps(steps, mu=mu)
    nat.set_timesteps(steps, mu=mu)
    _assert_same_schedule(nat, ref)


@pytest.mark.parametrize("name", sorted(EULER_CONFIGS))
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_euler_schedule(name, steps):
    nat, ref = _pair(FlowMatchEulerDiscreteScheduler, diffusers.FlowMatchEulerDiscreteScheduler, EULER_CONFIGS[name])
    mu = calculate_shift(1024) if ref.config.use_dynamic_shifting else None
    if ref.config.shift_terminal and steps == 1:
        # The only sigma is 1, so diffusers stretches by 0 / 0 (NaN); diffc refuses the schedule.
        with pytest.raises(InvalidArgumentError, match="shift_terminal"):
            nat.set_timesteps(steps, mu=mu)
        return
    ref.set_timesteps(steps, mu=mu)
    nat.set_timesteps(steps, mu=mu)
    _assert_same_schedule(nat, ref)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell", "wan-shift7", "shift-terminal"])
def test_euler_rollout(name, dtypes):
    nat, ref = _pair(FlowMatchEulerDiscreteScheduler, diffusers.FlowMatchEulerDiscreteScheduler, EULER_CONFIGS[name])
    steps = 7
    mu = calculate_shift(FLUX_SEQ_LENS[2]) if ref.config.use_dynamic_shifting else None
    sigmas = np.linspace(1.0, 1 / steps, steps)
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    nat.set_timesteps(steps, sigmas=list(sigmas), mu=mu)
    _rollout(nat, ref, FLUX_LATENT, *dtypes)


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("res", sorted(WAN_UNIPC))
def test_unipc_wan_schedule(res, steps):
    nat, ref = _pair(UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler, WAN_UNIPC[res])
    ref.set_timesteps(steps)
    nat.set_timesteps(steps)
    _assert_same_schedule(nat, ref)
    assert nat.timesteps.dtype == torch.int64 and nat.sigmas.device.type == "cpu"


@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16", "fp32-latents-bf16-output"],  # the last is WanPipeline's mix
)
@pytest.mark.parametrize("res", sorted(WAN_UNIPC))
def test_unipc_wan_rollout(res, dtypes):
    nat, ref = _pair(UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler, WAN_UNIPC[res])
    ref.set_timesteps(12)
    nat.set_timesteps(12)
    _rollout(nat, ref, WAN_LATENT, *dtypes)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"lower_order_final": False},
        {"final_sigmas_type": "sigma_min"},
        {"disable_corrector": [0, 2]},
        {"use_dynamic_shifting": True},
        {"shift_terminal": 0.05},
    ],
    ids=["default", "no-lower-order-final", "final-sigma-min", "disable-corrector", "dynamic-shift", "shift-terminal"],
)
def test_unipc_flow_variants(order, solver_type, extra):
    config = {**WAN_UNIPC["480p"], "solver_order": order, "solver_type": solver_type, **extra}
    nat, ref = _pair(UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler, config)
    mu = calculate_shift(1024) if extra.get("use_dynamic_shifting") else None
    ref.set_timesteps(6, mu=mu)
    nat.set_timesteps(6, mu=mu)
    _assert_same_schedule(nat, ref)
    last_step = "compare"
    if solver_type == "bh1" and config["final_sigmas_type"] == "zero":
        last_step = "ref-nan"  # diffusers' bh1 step to sigma 0 computes inf * 0; diffc returns the finite limit
    if not config["lower_order_final"] and order > 1:
        last_step = "skip"  # a multistep update to sigma 0 has an infinite log-SNR gap (NaN or singular)
    _rollout(nat, ref, WAN_LATENT, torch.float32, torch.float32, last_step=last_step)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_unipc_ddpm_modes(prediction_type, spacing):
    config = {
        "prediction_type": prediction_type,
        "timestep_spacing": spacing,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "steps_offset": 1,
        "solver_order": 3,
    }
    nat, ref = _pair(UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler, config)
    for steps in STEP_COUNTS[:4]:
        ref.set_timesteps(steps)
        nat.set_timesteps(steps)
        _assert_same_schedule(nat, ref)
    _rollout(nat, ref, WAN_LATENT, torch.float32, torch.float32)


@pytest.mark.parametrize(
    "native_cls, config",
    [(FlowMatchEulerDiscreteScheduler, EULER_CONFIGS["flux-dev"]), (UniPCMultistepScheduler, WAN_UNIPC["480p"])],
)
def test_reuse_for_two_generations(native_cls, config):
    sched = native_cls.from_config(config)
    mu = calculate_shift(1024)

    def generate():
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(WAN_LATENT, generator=gen)
        sched.set_timesteps(9, mu=mu)
        for t in sched.timesteps:
            x = sched.step(torch.randn(WAN_LATENT, generator=gen), t, x)
        return x

    first = generate()
    sched.set_timesteps(3, mu=mu)
    sched.step(torch.randn(WAN_LATENT), sched.timesteps[0], torch.randn(WAN_LATENT))  # abandoned midway
    assert torch.equal(generate(), first)


@pytest.mark.parametrize("native_cls", [FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler])
def test_bad_arguments(native_cls):
    config = {"use_dynamic_shifting": True, "prediction_type": "flow_prediction", "use_flow_sigmas": True}
    sched = native_cls.from_config(config)
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        sched.step(torch.ones(2, 2), 1.0, torch.ones(2, 2))
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(InvalidArgumentError) as info:
            sched.set_timesteps(bad, mu=0.5)
        assert info.value.field == "num_inference_steps"
    with pytest.raises(InvalidArgumentError, match="^mu:"):
        sched.set_timesteps(4)
    with pytest.raises(InvalidArgumentError, match="^sigmas:"):
        sched.set_timesteps(4, sigmas=[1.0, 0.5], mu=0.5)
    sched.set_timesteps(1, mu=0.5)
    sched.step(torch.ones(2, 2), sched.timesteps[0], torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(torch.ones(2, 2), sched.timesteps[0], torch.ones(2, 2))


def test_unipc_custom_sigmas_need_flow_sigmas():
    with pytest.raises(InvalidArgumentError, match="^sigmas:"):
        UniPCMultistepScheduler.from_config({}).set_timesteps(2, sigmas=[1.0, 0.5])


@pytest.mark.parametrize(
    "native_cls, field, value",
    [
        (FlowMatchEulerDiscreteScheduler, "invert_sigmas", True),
        (FlowMatchEulerDiscreteScheduler, "stochastic_sampling", True),
        (FlowMatchEulerDiscreteScheduler, "use_beta_sigmas", True),
        (FlowMatchEulerDiscreteScheduler, "time_shift_type", "cosine"),
        (FlowMatchEulerDiscreteScheduler, "num_train_timesteps", 0),
        (UniPCMultistepScheduler, "prediction_type", "x_start"),
        (UniPCMultistepScheduler, "solver_type", "dpmsolver++"),
        (UniPCMultistepScheduler, "solver_order", 0),
        (UniPCMultistepScheduler, "predict_x0", False),
        (UniPCMultistepScheduler, "thresholding", True),
        (UniPCMultistepScheduler, "use_karras_sigmas", True),
        (UniPCMultistepScheduler, "timestep_spacing", "uniform"),
        (UniPCMultistepScheduler, "final_sigmas_type", "one"),
        (UniPCMultistepScheduler, "beta_schedule", "squaredcos_cap_v2"),
        (UniPCMultistepScheduler, "rescale_betas_zero_snr", True),
    ],
)
def test_unsupported_config_values(native_cls, field, value):
    config = {"_class_name": native_cls.__name__, "_diffusers_version": "0.42.1", field: value}
    with pytest.raises(CheckpointError, match=field):
        native_cls.from_config(config)


def test_flow_prediction_requires_flow_sigmas():
    with pytest.raises(CheckpointError, match="use_flow_sigmas"):
        UniPCMultistepScheduler.from_config({"prediction_type": "flow_prediction"})


def test_configs_keep_diffusers_defaults():
    for native_cls, ref_cls in (
        (FlowMatchEulerDiscreteScheduler, diffusers.FlowMatchEulerDiscreteScheduler),
        (UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler),
    ):
        ours = native_cls.from_config({}).config.to_dict()
        theirs = {k: v for k, v in ref_cls().config.items() if not k.startswith("_")}
        assert ours == theirs


HOST_SYNCS = {"aten._local_scalar_dense.default", "aten._linalg_check_errors.default", "aten.is_nonzero.default",
              "aten.equal.default", "aten.nonzero.default"}


@pytest.mark.parametrize("native_cls, config, order", [
    (FlowMatchEulerDiscreteScheduler, EULER_CONFIGS["flux-dev"], None),
    (UniPCMultistepScheduler, WAN_UNIPC["480p"], 2),
    (UniPCMultistepScheduler, WAN_UNIPC["480p"], 3),
])
def test_steps_wait_for_nothing_on_the_host(native_cls, config, order):
    """On a device other than the schedule's, a step copies nothing from the host and reads nothing back (each
    would synchronize the stream and leave the GPU idle while the host issues the next DiT call): the sigmas
    cross once a generation. The samples live on the meta device, where every crossing is an explicit copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Traffic(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.crossings, self.syncs = 0, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and "device" in kwargs and args[0].device != kwargs["device"]:
                self.crossings += 1
            if str(func) in HOST_SYNCS:
                self.syncs.add(str(func))
            return func(*args, **kwargs)

    sched = native_cls.from_config({**config, **({"solver_order": order} if order else {})})
    sched.set_timesteps(8, mu=calculate_shift(1024))
    x = torch.zeros(WAN_LATENT, device="meta")
    traffic = Traffic()
    with traffic:
        for t in sched.timesteps:
            x = sched.step(torch.zeros(WAN_LATENT, device="meta"), t, x)
    assert traffic.crossings <= 1 and not traffic.syncs, (traffic.crossings, traffic.syncs)
