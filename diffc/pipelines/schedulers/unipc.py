"""UniPC multistep sampler (Zhao et al., 2023), data-prediction form, as Wan2.1 uses it.

Each step first corrects the current sample with the new model output (UniC), then predicts the
next sample from the last ``order`` outputs (UniP). Both work in log-SNR time
``lambda = log(alpha) - log(sigma)``: flow models use ``alpha = 1 - sigma``; DDPM-style models use
``alpha = 1 / sqrt(sigma^2 + 1)`` with ``sigma`` the noise-to-signal ratio.

A step waits for nothing on the host: the schedule's sigmas go to the samples' device once a generation
(a per-step copy of a host scalar synchronizes the stream, so the GPU would idle while the host issues the
rest of the step and the next DiT call), and the corrector's small linear system is solved without the
error check that reads its status back (the system is a Vandermonde matrix of distinct log-SNR ratios).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import CheckpointError, InvalidArgumentError
from ...models.config import ModelConfig
from .base import (
    Scheduler,
    check_choice,
    check_int,
    check_off,
    exponential_time_shift,
    linear_time_shift,
    stretch_to_terminal,
)


@dataclasses.dataclass(frozen=True)
class UniPCMultistepSchedulerConfig(ModelConfig):
    """``scheduler_config.json`` fields of diffusers' UniPCMultistepScheduler, same defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    solver_p: Any = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None


_WAN21 = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "solver_order": 2,
    "solver_type": "bh2",
    "lower_order_final": True,
    "timestep_spacing": "linspace",
    "final_sigmas_type": "zero",
}
# Published scheduler configs (Wan-AI/Wan2.1-T2V-*-Diffusers); flow_shift 3.0 for 480p, 5.0 for 720p.
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "wan2.1-480p": {**_WAN21, "flow_shift": 3.0},
    "wan2.1-720p": {**_WAN21, "flow_shift": 5.0},
}

# Solver types diffusers accepts; the legacy DPM-Solver names all mean bh2.
_SOLVER_TYPES = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve(a, b)`` (the same kernel) without its singularity check, which reads the status
    back to the host; UniPC's systems are Vandermonde matrices of distinct nodes, never singular."""
    return torch.linalg.solve_ex(a, b).result


class UniPCMultistepScheduler(Scheduler):
    """Native equivalent of diffusers' ``UniPCMultistepScheduler`` with ``predict_x0=True``.

    Supports ``prediction_type`` flow_prediction (with ``use_flow_sigmas``, static ``flow_shift`` or
    dynamic shifting with ``mu``), epsilon, v_prediction and sample; solver types bh1/bh2; any
    ``solver_order >= 1``. After ``set_timesteps``: ``timesteps`` is int64 ``(n,)`` on ``device``
    and ``sigmas`` float32 ``(n + 1,)`` on the CPU, as in diffusers.
    """

    config_class = UniPCMultistepSchedulerConfig
    config: UniPCMultistepSchedulerConfig

    def _validate(self) -> None:
        c, name = self.config, type(self).__name__
        check_int("num_train_timesteps", c.num_train_timesteps, 1, name)
        check_int("solver_order", c.solver_order, 1, name)
        predictions = ("flow_prediction", "epsilon", "v_prediction", "sample")
        check_choice("prediction_type", c.prediction_type, predictions, name)
        check_choice("solver_type", c.solver_type, tuple(_SOLVER_TYPES), name)
        check_choice("timestep_spacing", c.timestep_spacing, ("linspace", "leading", "trailing"), name)
        check_choice("final_sigmas_type", c.final_sigmas_type, ("zero", "sigma_min"), name)
        check_choice("predict_x0", c.predict_x0, (True,), name)
        check_choice("solver_p", c.solver_p, (None,), name)
        check_choice("time_shift_type", c.time_shift_type, ("exponential", "linear"), name)
        # Thresholding, Karras/exponential/beta spacing and zero-SNR rescaling are not implemented.
        off = ("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        check_off(c, off + ("rescale_betas_zero_snr",), name)
        if c.prediction_type == "flow_prediction":
            with_flow = name + " with prediction_type='flow_prediction'"
            check_choice("use_flow_sigmas", c.use_flow_sigmas, (True,), with_flow)
        if c.shift_terminal is not None and not c.use_flow_sigmas:
            raise CheckpointError("scheduler_config.json: shift_terminal is only supported with use_flow_sigmas=true")
        self._solver_type = _SOLVER_TYPES[c.solver_type]
        self._alphas_cumprod = None if c.use_flow_sigmas else self._training_alphas_cumprod()

    def _training_alphas_cumprod(self) -> torch.Tensor:
        c, n = self.config, self.config.num_train_timesteps
        if c.trained_betas is not None:
            betas = torch.tensor(c.trained_betas, dtype=torch.float32)
        elif c.beta_schedule == "linear":
            betas = torch.linspace(c.beta_start, c.beta_end, n, dtype=torch.float32)
        elif c.beta_schedule == "scaled_linear":
            betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, n, dtype=torch.float32) ** 2
        else:
            check_choice("beta_schedule", c.beta_schedule, ("linear", "scaled_linear"), type(self).__name__)
        return torch.cumprod(1.0 - betas, dim=0)

    # ---- schedule ----------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the schedule for one generation and reset the multistep history."""
        c = self.config
        if sigmas is not None and not c.use_flow_sigmas:
            raise InvalidArgumentError("sigmas", "custom sigmas need a scheduler config with use_flow_sigmas=true")
        n = self._resolve_steps(num_inference_steps, sigmas)
        if c.use_dynamic_shifting and mu is None:
            raise InvalidArgumentError("mu", "is required because the scheduler config sets use_dynamic_shifting")

        if c.use_flow_sigmas:
            sig, timesteps = self._flow_sigmas(n, sigmas, mu)
        else:
            timesteps = self._spaced_timesteps(n)
            acp = self._alphas_cumprod
            train_sigmas = (((1 - acp) / acp) ** 0.5).numpy()
            sig = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        if c.final_sigmas_type == "zero":
            last = 0
        elif c.use_flow_sigmas:
            last = sig[-1]
        else:
            last = (((1 - self._alphas_cumprod[0]) / self._alphas_cumprod[0]) ** 0.5).item()
        sig = np.concatenate([sig, [last]]).astype(np.float32)

        self.sigmas = torch.from_numpy(sig)  # (n + 1,), stays on the CPU
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)  # (n,)
        self.num_inference_steps = len(timesteps)
        self._model_outputs: list[torch.Tensor | None] = [None] * c.solver_order
        self._lower_order_nums = 0
        self._last_sample: torch.Tensor | None = None
        self._this_order = 0
        self._step_index = 0
        # self.sigmas on the samples' device: copied here when the device is given, else at the first step
        self._device_sigmas = None if device is None else self.sigmas.to(device)

    def _flow_sigmas(self, n: int, sigmas: Sequence[float] | None, mu: float | None):
        c = self.config
        if sigmas is None:
            sig = np.linspace(1, 1 / c.num_train_timesteps, n + 1)[:-1]
        else:
            sig = np.array(sigmas)
        if c.use_dynamic_shifting:
            shift_fn = exponential_time_shift if c.time_shift_type == "exponential" else linear_time_shift
            sig = shift_fn(mu, sig)
        else:
            sig = c.flow_shift * sig / (1 + (c.flow_shift - 1) * sig)
        if c.shift_terminal:
            sig = stretch_to_terminal(sig, c.shift_terminal)
        if np.fabs(sig[0] - 1) < 1e-6:
            sig[0] -= 1e-6  # keeps log(alpha) finite at the first step
        return sig, (sig * c.num_train_timesteps).copy()

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        c, n_train = self.config, self.config.num_train_timesteps
        if c.timestep_spacing == "linspace":
            return np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if c.timestep_spacing == "leading":
            ratio = n_train // (n + 1)
            t = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            return t + c.steps_offset
        ratio = n_train / n
        return np.arange(n_train, 0, -ratio).round().copy().astype(np.int64) - 1

    # ---- stepping ----------------------------------------------------------------------------

    def _alpha_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def _sigma_on(self, index: int, device: torch.device) -> torch.Tensor:
        """``self.sigmas[index]`` as a 0-dim tensor on ``device`` (the schedule crosses once a generation)."""
        if self._device_sigmas is None or self._device_sigmas.device != torch.device(device):
            self._device_sigmas = self.sigmas.to(device)
        return self._device_sigmas[index]

    def _lambda(self, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha, sigma, log-SNR) at schedule position ``index``, as 0-dim tensors on ``device``."""
        alpha, sigma = self._alpha_sigma(self._sigma_on(index, device))
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def _to_data(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """Model output -> predicted clean sample x0 at step ``i``."""
        kind = self.config.prediction_type
        sigma = self.sigmas[i]
        if kind == "flow_prediction":
            return sample - sigma * model_output
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        if kind == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if kind == "v_prediction":
            return alpha_t * sample - sigma_t * model_output
        return model_output

    def _update(
        self, x: torch.Tensor, s0: int, t: int, order: int, history: list[int], corrector_output: torch.Tensor | None
    ) -> torch.Tensor:
        """Move ``x`` from schedule position ``s0`` to ``t`` with the B(h) update of ``order``.

        ``history[k]`` is the schedule position of ``self._model_outputs[-(k + 2)]``. Predictor
        when ``corrector_output`` is None, corrector (which also uses the output at ``t``) otherwise.
        """
        device = x.device
        outputs = self._model_outputs
        m0 = outputs[-1]
        alpha_t, sigma_t, lambda_t = self._lambda(t, device)
        _, sigma_s0, lambda_s0 = self._lambda(s0, device)
        h = lambda_t - lambda_s0

        rks, d1s = [], []
        for k in range(1, order):
            rk = (self._lambda(history[k - 1], device)[2] - lambda_s0) / h
            rks.append(rk)
            d1s.append((outputs[-(k + 1)] - m0) / rk)
        rks.append(torch.ones((), device=device))
        rks = torch.stack(rks)

        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = hh if self._solver_type == "bh1" else torch.expm1(hh)
        h_phi_k, factorial, rows, b = h_phi_1 / hh - 1, 1, [], []
        for j in range(1, order + 1):
            rows.append(torch.pow(rks, j - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r_mat, b = torch.stack(rows), torch.stack(b)
        d1s = torch.stack(d1s, dim=1) if d1s else None  # (batch, order - 1, ...)

        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if corrector_output is None:
            if d1s is None:
                # diffusers subtracts ``alpha_t * b_h * 0`` here, which is NaN for bh1 when the
                # target sigma is 0 (b_h = -inf); the limit is x_t itself.
                return x_t.to(x.dtype)
            if order == 2:
                rhos = torch.ones(1, dtype=x.dtype, device=device) * 0.5
            else:
                rhos = _solve(r_mat[:-1, :-1], b[:-1]).to(device).to(x.dtype)
            res = torch.einsum("k,bkc...->bc...", rhos, d1s)
            return (x_t - alpha_t * b_h * res).to(x.dtype)

        if order == 1:
            rhos = torch.ones(1, dtype=x.dtype, device=device) * 0.5
        else:
            rhos = _solve(r_mat, b).to(device).to(x.dtype)
        res = torch.einsum("k,bkc...->bc...", rhos[:-1], d1s) if d1s is not None else 0
        d1_t = corrector_output - m0
        return (x_t - alpha_t * b_h * (res + rhos[-1] * d1_t)).to(x.dtype)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> torch.Tensor:
        """One UniPC step; same dtypes and type promotion as diffusers (no extra upcast).

        The ``timestep`` argument is accepted for interface compatibility and not read.
        """
        i = self._begin_step()
        c = self.config
        x0 = self._to_data(model_output, sample, i)
        if i > 0 and (i - 1) not in c.disable_corrector and self._last_sample is not None:
            history = [i - 1 - k for k in range(1, self._this_order)]
            sample = self._update(self._last_sample, i - 1, i, self._this_order, history, corrector_output=x0)

        self._model_outputs = self._model_outputs[1:] + [x0]
        order = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
        self._this_order = min(order, self._lower_order_nums + 1)
        self._last_sample = sample
        history = [i - k for k in range(1, self._this_order)]
        prev_sample = self._update(sample, i, i + 1, self._this_order, history, corrector_output=None)

        self._lower_order_nums = min(self._lower_order_nums + 1, c.solver_order)
        self._step_index = i + 1
        return prev_sample
