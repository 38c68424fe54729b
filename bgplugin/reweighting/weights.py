r"""Importance weights of flow samples: log-weights, effective sample sizes, clipping, diagnostics.

For samples :math:`x_n \sim q` with reduced energies :math:`u(x_n)` (kT) the
unnormalised importance weights towards :math:`p(x) \propto e^{-u(x)}` are

.. math:: \log w_n = -u(x_n) - \log q(x_n).

Every function here takes log-weights (float64, ``-inf`` = weight 0) and
works in log space, so weights spanning hundreds of orders of magnitude
(untrained flows) neither overflow nor underflow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import logsumexp

logger = logging.getLogger(__name__)

#: The definition string stored with the log-weights of reweighted flow samples.
LOG_WEIGHTS_DEFINITION = "-u(x) - log q(x)"
#: Quantile levels reported by :func:`weight_diagnostics`.
QUANTILE_LEVELS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def _as_1d(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, shape (n,), got shape {array.shape}")
    return array


def _check_log_w(log_w: Any, name: str = "log_w") -> np.ndarray:
    array = _as_1d(log_w, name)
    if len(array) == 0:
        raise ValueError(f"{name} is empty; need at least one sample")
    if np.isnan(array).any() or np.isposinf(array).any():
        raise ValueError(
            f"{name} contains NaN or +inf ({int(np.isnan(array).sum())} NaN, {int(np.isposinf(array).sum())} +inf); "
            "build log-weights with log_weights(u, log_q), which maps failed frames to -inf"
        )
    return array


def log_weights(u: Any, log_q: Any) -> np.ndarray:
    r"""Log importance weights :math:`\log w = -u - \log q` (unnormalised).

    Parameters
    ----------
    u : array-like or Tensor, shape (n,)
        Reduced energies of the samples, kT. ``+inf``/NaN mark failed
        evaluations.
    log_q : array-like or Tensor, shape (n,)
        Log-densities of the samples under the proposal (nats, on the same
        coordinates as ``u``).

    Returns
    -------
    ndarray of float64, shape (n,)
        ``-u - log_q``; ``-inf`` (weight 0) wherever ``u`` or ``log_q`` is not
        finite.
    """
    u_arr, lq_arr = _as_1d(u, "u"), _as_1d(log_q, "log_q")
    if u_arr.shape != lq_arr.shape:
        raise ValueError(f"u and log_q must have the same shape, got {u_arr.shape} and {lq_arr.shape}")
    ok = np.isfinite(u_arr) & np.isfinite(lq_arr)
    out = np.full(u_arr.shape, -np.inf)
    out[ok] = -u_arr[ok] - lq_arr[ok]
    return out


def normalized_weights(log_w: Any) -> np.ndarray:
    """Weights that sum to 1, shape (n,), from log-weights (``-inf`` gives 0).

    Raises ``ValueError`` when every log-weight is ``-inf``.
    """
    array = _check_log_w(log_w)
    if not np.isfinite(array).any():
        raise ValueError("every log-weight is -inf: no sample has positive weight (all energies failed?)")
    return np.exp(array - logsumexp(array))


def ess(log_w: Any) -> float:
    r"""Kish effective sample size as a fraction of the number of samples.

    .. math:: \mathrm{ESS} = \frac{1}{n}\,\frac{\left(\sum_i w_i\right)^2}{\sum_i w_i^2} \in [1/n, 1]

    Parameters
    ----------
    log_w : array-like, shape (n,)
        Log-weights; ``-inf`` entries (failed or rejected samples) count in
        ``n``, so failures lower the ESS.

    Returns
    -------
    float
        In ``[0, 1]``; 0 when every weight is 0.
    """
    array = _check_log_w(log_w)
    if not np.isfinite(array).any():
        return 0.0
    return float(np.exp(2.0 * logsumexp(array) - logsumexp(2.0 * array)) / len(array))


def forward_ess(log_q_data: Any, u_data: Any, data_log_weights: Any | None = None) -> float:
    r"""Forward effective sample size from samples of the target (Midgley et al., ICLR 2023).

    The Kish ESS of importance sampling with proposal :math:`q` tends to
    :math:`n / \mathbb{E}_q[\bar w^2]` with normalised weights
    :math:`\bar w = p/q`. Since :math:`\mathbb{E}_q[\bar w^2] =
    \mathbb{E}_p[\bar w]` and :math:`Z = 1/\mathbb{E}_p[1/w]` for the
    unnormalised :math:`w = e^{-u}/q`, it can be estimated from samples of the
    target :math:`p` itself (e.g. MD data), where the reverse ESS can be
    misleadingly high when the flow misses modes:

    .. math::

        \frac{\mathrm{ESS}_\mathrm{fwd}}{n} = \frac{1}{\mathbb{E}_p[w]\,\mathbb{E}_p[w^{-1}]}
        \approx \frac{\left(\sum_i v_i\right)^2}{\sum_i v_i w_i \, \sum_i v_i w_i^{-1}},
        \qquad w_i = e^{-u(x_i) - \log q(x_i)},

    with :math:`v_i = 1` for unbiased data (then it is
    :math:`n^2 / (\sum_i w_i \sum_i w_i^{-1})`, Midgley et al.'s estimator) or
    the data's own importance weights towards :math:`p` (biased or umbrella
    data), which turn both expectations into self-normalised estimates.

    Parameters
    ----------
    log_q_data : array-like, shape (n,)
        Flow log-density of each data frame (nats).
    u_data : array-like, shape (n,)
        Reduced target energy of each data frame (kT). Frames whose energy is
        not finite cannot be samples of the target: they are dropped (and
        logged).
    data_log_weights : array-like, shape (n,), or None
        Log-weights of the data frames with respect to the target (``-inf``
        allowed); None for unbiased samples of the target.

    Returns
    -------
    float
        In ``[0, 1]``; 0 when the flow gives zero density to a data frame
        (``log_q = -inf``: a mode is missing).
    """
    lq, u = _as_1d(log_q_data, "log_q_data"), _as_1d(u_data, "u_data")
    if lq.shape != u.shape:
        raise ValueError(f"log_q_data and u_data must have the same shape, got {lq.shape} and {u.shape}")
    lv = np.zeros_like(u) if data_log_weights is None else _check_log_w(data_log_weights, "data_log_weights")
    if lv.shape != u.shape:
        raise ValueError(f"data_log_weights must have shape {u.shape}, got {lv.shape}")
    if np.isnan(lq).any():
        raise ValueError("log_q_data contains NaN; the flow's log_prob failed on some data frames")
    bad_u = ~np.isfinite(u)
    if bad_u.any():
        logger.warning("forward_ess: dropping %d data frames whose target energy is not finite", int(bad_u.sum()))
        lq, u, lv = lq[~bad_u], u[~bad_u], lv[~bad_u]
    keep = np.isfinite(lv)
    lq, u, lv = lq[keep], u[keep], lv[keep]
    if len(u) == 0:
        raise ValueError("forward_ess needs at least one data frame with finite energy and positive weight")
    if np.isneginf(lq).any() or np.isposinf(lq).any():
        return 0.0
    lw = -u - lq
    log_norm = logsumexp(lv)
    log_mean_w = logsumexp(lv + lw) - log_norm
    log_mean_inv_w = logsumexp(lv - lw) - log_norm
    return float(min(1.0, np.exp(-(log_mean_w + log_mean_inv_w))))


def clip_log_weights(
    log_w: Any, quantile: float | None = None, max_fraction: float | None = None
) -> tuple[np.ndarray, float]:
    r"""Cap the largest weights (biased but lower-variance estimates); off unless asked for.

    Give exactly one of

    * ``quantile``: weights above the ``quantile`` of the finite log-weights
      are set to it (e.g. 0.999 clips the top 0.1 %);
    * ``max_fraction`` (:math:`f`): the largest cap :math:`c` under which no
      normalised weight exceeds :math:`f`, i.e. the solution of :math:`c =
      f \sum_i \min(w_i, c)`; nothing is clipped when the largest normalised
      weight is already :math:`\le f`. Needs :math:`f \ge 1 / n_\mathrm{finite}`.

    Parameters
    ----------
    log_w : array-like, shape (n,)
    quantile : float in (0, 1] or None
    max_fraction : float in (0, 1] or None

    Returns
    -------
    clipped : ndarray, shape (n,)
        Log-weights with the cap applied (``-inf`` entries unchanged).
    fraction_clipped : float
        Fraction of all ``n`` samples whose weight was lowered.
    """
    array = _check_log_w(log_w)
    if (quantile is None) == (max_fraction is None):
        raise ValueError(
            f"give exactly one of quantile or max_fraction, got quantile={quantile}, max_fraction={max_fraction}"
        )
    finite = np.isfinite(array)
    if not finite.any():
        return array.copy(), 0.0
    values = array[finite]
    if quantile is not None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        cap = float(np.quantile(values, quantile))
    elif max_fraction is not None:
        n_finite = len(values)
        if not 1.0 / n_finite <= max_fraction <= 1.0:
            raise ValueError(
                f"max_fraction must be in [1/n_finite, 1] = [{1.0 / n_finite:.3g}, 1] for {n_finite} samples with "
                f"positive weight, got {max_fraction}"
            )
        cap = _max_fraction_cap(values, float(max_fraction))
    clipped = array.copy()
    over = finite & (array > cap)
    clipped[over] = cap
    fraction = float(over.sum()) / len(array)
    if over.any():
        logger.info("clipped %d of %d log-weights at %.4g (fraction %.3g)", int(over.sum()), len(array), cap, fraction)
    return clipped, fraction


def _max_fraction_cap(values: np.ndarray, f: float) -> float:
    """log c with c = f * sum_i min(w_i, c) for finite log-weights ``values`` (log space, descending scan)."""
    order = np.sort(values)[::-1]
    shift = order[0]
    w = np.exp(order - shift)
    if w[0] / w.sum() <= f:
        return float(np.inf)  # nothing to clip
    n = len(w)
    # clipping the k largest: c_k = f * S_k / (1 - f k), S_k = sum of the n - k smallest; valid if w[k] <= c_k
    tail = np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])  # tail[k] = sum_{i >= k} w[i]
    for k in range(1, n + 1):
        denominator = 1.0 - f * k
        if denominator <= 0:
            break
        c = f * tail[k] / denominator
        below = w[k] if k < n else 0.0
        if below <= c <= w[k - 1]:
            return float(np.log(c) + shift)
    raise ValueError(f"no cap satisfies max_fraction={f} for {n} weights; use a larger max_fraction")


def resolve_clip(clip: Mapping[str, float] | None) -> dict[str, float] | None:
    """Validate a clipping option ``{"quantile": q}`` or ``{"max_fraction": f}`` (None: no clipping)."""
    if clip is None:
        return None
    if not isinstance(clip, Mapping):
        raise TypeError(f"clip must be None or a mapping like {{'quantile': 0.999}}, got {type(clip).__name__}")
    allowed = {"quantile", "max_fraction"}
    unknown = sorted(set(clip) - allowed)
    if unknown or len(clip) != 1:
        raise ValueError(
            f"clip must have exactly one key out of {sorted(allowed)}, e.g. {{'quantile': 0.999}}; got {dict(clip)}"
        )
    return {key: float(value) for key, value in clip.items()}


@dataclass(frozen=True)
class WeightDiagnostics:
    r"""Summary of a set of importance weights.

    Attributes
    ----------
    n : int
        Number of samples (including those with weight 0).
    n_finite : int
        Samples with positive weight.
    ess : float
        Kish ESS as a fraction of ``n`` (see :func:`ess`).
    n_effective : float
        Kish ESS in samples (``ess * n``).
    max_weight_fraction : float
        Largest normalised weight.
    log_mean_weight : float
        :math:`\log \frac{1}{n}\sum_i w_i`, an estimate of :math:`\log Z_p -
        \log Z_q`, i.e. minus the free energy of the target relative to the
        proposal (kT); ``-inf`` when every weight is 0.
    log_weight_quantiles : dict of str to float
        Quantiles of the finite log-weights minus their log-sum, i.e. of the
        log normalised weights (keys like ``"q0.5"``).
    """

    n: int
    n_finite: int
    ess: float
    n_effective: float
    max_weight_fraction: float
    log_mean_weight: float
    log_weight_quantiles: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy (non-finite numbers become None)."""
        out = asdict(self)
        for key in ("log_mean_weight",):
            if not np.isfinite(out[key]):
                out[key] = None
        return out


def weight_diagnostics(log_w: Any) -> WeightDiagnostics:
    """:class:`WeightDiagnostics` of log-weights, shape (n,)."""
    array = _check_log_w(log_w)
    finite = np.isfinite(array)
    n, n_finite = len(array), int(finite.sum())
    if n_finite == 0:
        return WeightDiagnostics(n, 0, 0.0, 0.0, 0.0, float("-inf"), {})
    total = logsumexp(array)
    normalised = array[finite] - total
    fraction = ess(array)
    quantiles = np.quantile(normalised, QUANTILE_LEVELS)
    return WeightDiagnostics(
        n=n,
        n_finite=n_finite,
        ess=fraction,
        n_effective=fraction * n,
        max_weight_fraction=float(np.exp(normalised.max())),
        log_mean_weight=float(total - np.log(n)),
        log_weight_quantiles={f"q{level:g}": float(v) for level, v in zip(QUANTILE_LEVELS, quantiles)},
    )


@dataclass(frozen=True)
class TargetLikelihood:
    r"""How close a flow is to the exact target density on data: see :func:`target_likelihood`.

    All values in nats, on the coordinates of the energies and log-densities
    given (for particle systems: the mean-free subspace).

    Attributes
    ----------
    log_z, log_z_stderr : float
        Importance-sampling estimate of :math:`\log Z = \log\int e^{-u}`
        from the flow samples, and its delta-method standard error.
    nll_target, nll_target_stderr : float
        Mean of :math:`-\log p(x_i) = u(x_i) + \log Z` over the data: the NLL
        the *exact* target density scores on these configurations, the floor
        that a flow can only go below by fitting how the data deviate from
        the target. Standard error from the data's spread and ``log_z_stderr``.
    kl, kl_stderr : float
        Mean of :math:`\log p(x_i) - \log q(x_i)`: the paired estimate of
        :math:`\mathrm{KL}(p\,\|\,q)`, i.e. flow NLL minus ``nll_target``.
        Its error is much smaller than the NLL's because the data's spread
        cancels; a significantly negative value means the data are not
        distributed as the target (or ``log q`` is biased high).
    n_data, n_samples, n_failed_samples : int
        Data configurations used, flow samples drawn, and flow samples with
        weight 0 (failed energy or log q; they count in ``n_samples``).
    ess : float
        Kish ESS / n of the flow samples' weights. Below a few per cent the
        estimate of :math:`\log Z` is biased low by more than its standard
        error says, which biases ``nll_target`` low and ``kl`` high: the
        reported KL is then conservative (too large), not reliable.
    log_z_forward, log_z_forward_stderr : float
        The same constant from the data instead,
        :math:`\log\hat Z = -\log\frac1m\sum_i e^{u(x_i) + \log q(x_i)}`
        (:math:`Z = 1/\mathbb{E}_p[1/w]`), with its delta-method error. The
        reverse estimate ``log_z`` tends to come out low and this one high
        (Jensen, and regions one of the two samples misses), so together
        they bracket :math:`\log Z`; when they agree, the floor
        ``nll_target`` is pinned.
    """

    log_z: float
    log_z_stderr: float
    nll_target: float
    nll_target_stderr: float
    kl: float
    kl_stderr: float
    n_data: int
    n_samples: int
    n_failed_samples: int
    ess: float
    log_z_forward: float
    log_z_forward_stderr: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        return asdict(self)


def target_likelihood(
    log_w_samples: Any, u_data: Any, log_q_data: Any, data_log_weights: Any | None = None
) -> TargetLikelihood:
    r"""The exact target density's NLL on data, and the flow's KL from it, normalised with the flow's own samples.

    With flow samples :math:`x_n \sim q` and log-weights
    :math:`\log w_n = -u(x_n) - \log q(x_n)`,
    :math:`\hat Z = \frac1n\sum_n w_n` is an unbiased estimate of the target's
    normalising constant (its log is biased low by about
    ``log_z_stderr² / 2``). With it, the normalised target log-density of
    each data configuration is :math:`\log p(x_i) = -u(x_i) - \log\hat Z`,
    which gives the NLL of the exact density on the data (the best a perfect
    model of the target can score there) and the paired KL estimate
    :math:`\frac1m\sum_i[\log p(x_i) - \log q(x_i)]`.

    Parameters
    ----------
    log_w_samples : array-like, shape (n,)
        Log-weights of flow samples (:func:`log_weights`; ``-inf`` for failed
        samples, which count as weight 0). For augmented flows pass the
        joint weights :math:`-u(x) + \log\pi(a|x) - \log q(x, a)`, whose mean
        is also :math:`Z`.
    u_data : array-like, shape (m,)
        Reduced target energies of the data configurations (kT).
    log_q_data : array-like, shape (m,)
        The flow's log-density of the same configurations.
    data_log_weights : array-like, shape (m,), optional
        Log-weights of the data towards the target (biased or umbrella data,
        e.g. ``dataset.log_weights``; ``-inf`` allowed): the data means become
        self-normalised weighted means and the standard errors use the
        data's Kish effective size. None: unbiased samples of the target.

    Returns
    -------
    TargetLikelihood

    Examples
    --------
    A Gaussian flow equal to the target: the exact density's NLL is the
    flow's own, and the KL is zero.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> def log_q(x):
    ...     return -0.5 * x**2 - 0.5 * np.log(2 * np.pi)
    >>> x, data = rng.normal(size=20000), rng.normal(size=5000)
    >>> u = lambda x: 0.5 * x**2 + 3.0          # Z = sqrt(2 pi) exp(-3)
    >>> r = target_likelihood(log_weights(u(x), log_q(x)), u(data), log_q(data))
    >>> round(r.log_z, 3), round(float(0.5 * np.log(2 * np.pi) - 3.0), 3), abs(r.kl) < 1e-12
    (-2.081, -2.081, True)
    """
    lw = _check_log_w(log_w_samples, "log_w_samples")
    finite = np.isfinite(lw)
    if not finite.any():
        raise ValueError("every log-weight in log_w_samples is -inf: no flow sample has positive weight, so Z "
                         "cannot be estimated; train the flow further or check the energy")  # fmt: skip
    u, lq = _as_1d(u_data, "u_data"), _as_1d(log_q_data, "log_q_data")
    if u.shape != lq.shape:
        raise ValueError(f"u_data and log_q_data must have the same shape, got {u.shape} and {lq.shape}")
    lv = np.zeros_like(u) if data_log_weights is None else _check_log_w(data_log_weights, "data_log_weights")
    if lv.shape != u.shape:
        raise ValueError(f"data_log_weights must have shape {u.shape}, got {lv.shape}")
    if np.isnan(lq).any():
        raise ValueError("log_q_data contains NaN; the flow's log_prob failed on some data configurations")
    keep = np.isfinite(u) & np.isfinite(lq)
    if not keep.all():
        logger.warning("target_likelihood: dropping %d data configurations with a non-finite energy or log q",
                       int((~keep).sum()))  # fmt: skip
    keep &= np.isfinite(lv)
    if not keep.any():
        raise ValueError("no data configuration has a finite energy, a finite flow log-density and a positive weight")
    u, lq, lv = u[keep], lq[keep], lv[keep]
    v = np.exp(lv - lv.max())
    v /= v.sum()
    m_eff = 1.0 / float((v**2).sum())  # Kish effective size of the data
    n = len(lw)
    log_z = float(logsumexp(lw) - np.log(n))
    ratio = np.exp(lw - log_z)  # w / Z-hat: mean 1, -inf -> 0
    log_z_err = float(ratio.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    nll_target = u + log_z
    log_ratio = -nll_target - lq  # log p - log q

    def mean_and_error(values: np.ndarray) -> tuple[float, float]:
        mean = float(v @ values)
        spread = float(np.sqrt(v @ (values - mean) ** 2 * m_eff / (m_eff - 1.0))) if m_eff > 1.0 + 1e-9 else 0.0
        return mean, spread / float(np.sqrt(m_eff))

    nll_mean, nll_err = mean_and_error(nll_target)
    kl_mean, kl_err = mean_and_error(log_ratio)
    log_inverse_w = u + lq  # log(1 / w) of each data configuration
    log_z_forward = -float(logsumexp(log_inverse_w, b=v))
    inverse_ratio = np.exp(log_inverse_w + log_z_forward)  # (1/w) / (1/Z-hat): weighted mean 1
    _, forward_err = mean_and_error(inverse_ratio)
    return TargetLikelihood(
        log_z=log_z,
        log_z_stderr=log_z_err,
        nll_target=nll_mean,
        nll_target_stderr=float(np.hypot(nll_err, log_z_err)),
        kl=kl_mean,
        kl_stderr=float(np.hypot(kl_err, log_z_err)),
        n_data=len(u),
        n_samples=n,
        n_failed_samples=int((~finite).sum()),
        ess=float(ratio.sum() ** 2 / (ratio**2).sum() / n),
        log_z_forward=log_z_forward,
        log_z_forward_stderr=forward_err,
    )
