r"""Closed-form rates, the norm ratio Omega, the fit curve K(t) and its bounds.

All functions are pure and work on tensors of any shape. The chapters "The firing-rate
approximation" and "The optimal fit curve and the squeeze theorem" derive each of them.

Lexicon: ``a`` or ``r_hat`` is the ANN activation after the RNL (in [0, 1]), ``rate`` the SNN
firing rate after ``t`` steps, ``omega`` the norm ratio, ``fit`` the fit curve K(t).

One rule, one function: :func:`if_step` is the integrate-and-fire update that every simulator of the
package runs (:func:`if_trace`, :func:`simulate_if`, :class:`annsnn.convert.IFNeuron`, the reference of
the GPU kernels), and :func:`omega` is the only definition of the norm ratio.
"""
from __future__ import annotations

import torch

V0_CHOICES = ("zero", "half")
RESETS = ("subtract", "zero")


def v0_fraction(v0: str | float) -> float:
    """The initial membrane potential as a fraction of the threshold: ``'zero'`` is 0, ``'half'`` is 0.5."""
    if isinstance(v0, str):
        if v0 not in V0_CHOICES:
            raise ValueError(f"v0 must be 'zero' or 'half' (or a fraction of the threshold), got {v0!r}")
        return 0.0 if v0 == "zero" else 0.5
    return float(v0)


def if_rate_constant(a: torch.Tensor, t: int | torch.Tensor, v0: str | float = "zero") -> torch.Tensor:
    r"""Firing rate after ``t`` steps of an IF neuron (reset by subtraction) with constant input.

    The input per step is ``a * v_th``. With the membrane starting at ``v(0) = v0 * v_th``,
    the spike count after ``t`` steps is :math:`\lfloor t a + v_0 \rfloor` clipped to ``[0, t]``, so

    .. math::
        r(t) = \frac{\min(\max(\lfloor t a \rfloor, 0), t)}{t} \quad (v(0)=0), \qquad
        r(t) = \frac{\min(\max(\lfloor t a + \tfrac12 \rfloor, 0), t)}{t} \quad (v(0)=\theta/2).

    ``t`` may be an int or a tensor broadcastable against ``a``.
    """
    frac = v0_fraction(v0)
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    count = torch.floor(t * a + frac)
    return torch.minimum(count.clamp_min(0), t) / t


def if_step(v: torch.Tensor, x: torch.Tensor, v_th: float | torch.Tensor,
            reset: str = "subtract") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""One time step of integrate-and-fire neurons: integrate, fire, reset.

    .. math:: v^{pre} = v + x, \quad s = [v^{pre} \ge v_{th}], \quad
              v \leftarrow v^{pre} - s\, v_{th} \ (\text{reset by subtraction}).

    Returns ``(v_pre, s, v_next)``: the membrane after integrating, the spikes (0 or 1, in ``x``'s
    dtype) and the membrane after the reset. ``reset='zero'`` sets a neuron that fired back to 0
    instead, :math:`v \leftarrow (1 - s)\, v^{pre}`, which throws away what the membrane held above
    the threshold. Conversion uses reset by subtraction. This is the one definition of the rule:
    every simulator in the package calls it.
    """
    if reset not in RESETS:
        raise ValueError(f"reset must be 'subtract' or 'zero', got {reset!r}")
    v_pre = v + x
    s = (v_pre >= v_th).to(x.dtype)
    v_next = v_pre - s * v_th if reset == "subtract" else v_pre * (1 - s)
    return v_pre, s, v_next


def if_trace(x: torch.Tensor, v_th: float | torch.Tensor = 1.0, v0: str | float = "zero",
             reset: str = "subtract") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Step-by-step IF neurons that also return the membrane potential (chapter "Spiking neurons").

    ``x`` is the input current, shape ``[T, ...]``; the membrane starts at ``v0 * v_th``. Each step is
    :func:`if_step`. Returns ``(v_pre, s, v)``, each ``[T, ...]``: the membrane after integrating step
    ``t`` (before any reset), the spikes, and the membrane after the reset. With ``reset='subtract'``
    (what conversion uses)

    .. math:: v_t^{pre} = v_{t-1} + x_t, \quad s_t = [v_t^{pre} \ge v_{th}], \quad v_t = v_t^{pre} - s_t v_{th},

    and with ``reset='zero'`` the last step is :math:`v_t = (1 - s_t)\, v_t^{pre}`.
    """
    v = torch.full_like(x[0], v0_fraction(v0)) * v_th
    pre, spikes, post = [], [], []
    for x_t in x:
        v_pre, s, v = if_step(v, x_t, v_th, reset)
        pre.append(v_pre)
        spikes.append(s)
        post.append(v)
    return torch.stack(pre), torch.stack(spikes), torch.stack(post)


def simulate_if(x: torch.Tensor, v_th: float | torch.Tensor = 1.0, v0: str | float = "zero") -> torch.Tensor:
    """Step-by-step IF neurons with reset by subtraction; ``x`` is the input current, shape ``[T, ...]``.

    Returns the spikes, shape ``[T, ...]`` (the middle output of :func:`if_trace`).
    """
    return if_trace(x, v_th=v_th, v0=v0)[1]


def rates_over_time(spikes: torch.Tensor) -> torch.Tensor:
    """Firing rate after each step ``t = 1..T`` from spikes of shape ``[T, ...]``."""
    T = spikes.shape[0]
    steps = torch.arange(1, T + 1, dtype=spikes.dtype, device=spikes.device)
    return spikes.cumsum(0) / steps.view(-1, *([1] * (spikes.dim() - 1)))


def omega_ratio(l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    r"""Omega from its two sums, :math:`\lVert \hat r \rVert_1 / \lVert \hat r \rVert_2^2`, with a silent layer's Omega = 1.

    A layer whose rates are all zero has no rate to approximate, so it adds no latency; its Omega is
    set to 1, the smallest value Omega takes, rather than 0/0. ``l1`` and ``l2`` may be tensors of
    sums (one per layer); the result is differentiable wherever ``l2 > 0``.
    """
    silent = l2 <= 0
    return torch.where(silent, torch.ones_like(l1), l1 / torch.where(silent, torch.ones_like(l2), l2))


def omega(r_hat: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    r"""Norm ratio of a layer's rates, :math:`\Omega = \lVert \hat r \rVert_1 / \lVert \hat r \rVert_2^2`.

    For ``r_hat`` in [0, 1], ``omega >= 1``, with equality when every non-zero rate equals 1.

    **Which Omega.** The package uses one quantity everywhere, the *layer Omega* :math:`\Omega_l`: the
    rates of all of layer ``l``'s neurons on all the images at hand are pooled into one vector (a
    batch in stage-2 training, the validation split for the guard, the test set in the simulator),
    because the fit curve :math:`K(t)` it bounds is pooled the same way. A network's Omega,
    :math:`\overline{\Omega}`, is the mean of its layers' :math:`\Omega_l` (:class:`annsnn.train.OmegaProbe`).
    An all-zero ``r_hat`` gives 1 (:func:`omega_ratio`). ``dim`` pools only some dimensions:
    ``dim=tuple(range(1, r_hat.dim()))`` gives one value per image, the *image Omega*, which the
    package does not use but the chapter "The optimal fit curve" compares with.
    """
    dims = tuple(range(r_hat.dim())) if dim is None else dim
    return omega_ratio(r_hat.abs().sum(dims), r_hat.pow(2).sum(dims))


def fit_curve(rate: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    r"""The fit curve :math:`K(t) = \lVert r(t) - \hat r \rVert_2^2 / \lVert \hat r \rVert_2^2`.

    ``rate`` has shape ``[T, *r_hat.shape]`` (one row per ``t``) or ``r_hat.shape``; the result has
    one value per ``t``.
    """
    dims = tuple(range(rate.dim() - r_hat.dim(), rate.dim()))
    return (rate - r_hat).pow(2).sum(dims) / r_hat.pow(2).sum()


def fit_bound(omega_value: torch.Tensor | float, t: torch.Tensor | int, v0: str | float = "zero") -> torch.Tensor:
    r"""Upper bound on :math:`K(t)` for a layer driven by constant input.

    With :math:`v(0)=0` the error :math:`\hat r - r(t)` lies in :math:`[0, \min(\hat r, 1/t)]`, so
    :math:`(\hat r - r)^2 \le \hat r / t` and :math:`K(t) \le \Omega / t`. With :math:`v(0)=\theta/2`
    the error is at most :math:`\min(\hat r, 1/(2t))` in size, which gives :math:`K(t) \le \Omega/(2t)`.
    """
    frac = v0_fraction(v0)
    if frac not in (0.0, 0.5):
        raise ValueError("fit_bound is derived for v0='zero' and v0='half' only")
    c = 1.0 if frac == 0.0 else 0.5
    return c * torch.as_tensor(omega_value, dtype=torch.float64) / torch.as_tensor(t, dtype=torch.float64)


def two_sided_bound(rate: torch.Tensor, r_hat: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    r"""Bound on :math:`K(t)` when every rate error is below ``1/t`` in size but may have either sign.

    From :math:`(r - \hat r)^2 \le |r - \hat r| / t \le (r + \hat r)/t`:

    .. math:: K(t) \le \frac{\lVert r(t) \rVert_1 + \lVert \hat r \rVert_1}{t\,\lVert \hat r \rVert_2^2}
              \xrightarrow{\;r(t) \to \hat r\;} \frac{2\,\Omega}{t}.

    This is where a constant of 2 comes from. ``rate`` is ``[T, *r_hat.shape]`` with row ``i`` at
    ``t = i + 1`` (or a single row with ``t`` given).
    """
    dims = tuple(range(rate.dim() - r_hat.dim(), rate.dim()))
    t = torch.as_tensor(t, dtype=rate.dtype, device=rate.device)
    return (rate.abs().sum(dims) + r_hat.abs().sum()) / (t * r_hat.pow(2).sum())


def poisson_input(a: torch.Tensor, T: int, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Bernoulli ("Poisson") spike trains of ``T`` steps whose expected rate is ``clip(a, 0, 1)``.

    Returns ``[T, *a.shape]`` spikes in {0, 1}: at every step each entry spikes with probability
    :math:`\mathrm{clip}(a, 0, 1)`, independently. The empirical rate after ``t`` steps has standard
    deviation :math:`\sqrt{a(1-a)/t}`, against at most :math:`1/t` for constant (direct) input
    (chapter "Spiking neurons and rate coding").
    """
    prob = a.clamp(0, 1).unsqueeze(0).expand(T, *a.shape)
    return torch.bernoulli(prob, generator=generator)
