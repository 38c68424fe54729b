r"""Training-set biasing along a CV with von Mises weights (equivariant flow matching, appendix C.4).

Frames are resampled with probability proportional to

.. math:: \omega(\phi) = s\, f_\mathrm{vM}(\phi \mid \mu, \kappa) + c,
   \qquad f_\mathrm{vM}(\phi \mid \mu, \kappa) = \frac{e^{\kappa \cos(\phi - \mu)}}{2\pi I_0(\kappa)},

(default :math:`s = 150, \mu = 1, \kappa = 10, c = 1`: the rare
:math:`\phi > 0` region of alanine dipeptide is oversampled) times the
frames' own normalised weights. A resampled copy of frame ``n`` then carries
the log-weight :math:`-\ln\omega(\phi_n)`: self-normalised importance
weighting with it recovers expectations under the original (weighted)
ensemble, so the bias can be undone exactly. The source index of every copy
is recorded too.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.special import i0e

from bgplugin.data import Dataset
from bgplugin.systems import CollectiveVariable

logger = logging.getLogger(__name__)


def von_mises_weight(
    phi: np.ndarray, mu: float = 1.0, kappa: float = 10.0, scale: float = 150.0, offset: float = 1.0
) -> np.ndarray:
    r"""Bias weight :math:`\omega(\phi) = s f_\mathrm{vM}(\phi|\mu,\kappa) + c`.

    Parameters
    ----------
    phi : ndarray, shape (n,), rad
    mu : float
        Mean of the von Mises density, rad.
    kappa : float
        Concentration (> 0).
    scale, offset : float
        :math:`s` and :math:`c` (``offset`` > 0 keeps every weight positive).

    Returns
    -------
    ndarray, shape (n,)
    """
    if not kappa > 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    if not offset > 0 or scale < 0:
        raise ValueError(f"need scale >= 0 and offset > 0 (weights must stay positive), got {scale}, {offset}")
    phi = np.asarray(phi, dtype=np.float64)
    # i0e(k) = exp(-k) I0(k): stable for large kappa
    density = np.exp(kappa * (np.cos(phi - mu) - 1.0)) / (2.0 * np.pi * i0e(kappa))
    return scale * density + offset


def bias_training_set(
    dataset: Dataset,
    cv: CollectiveVariable,
    n_samples: int | None = None,
    *,
    mu: float = 1.0,
    kappa: float = 10.0,
    scale: float = 150.0,
    offset: float = 1.0,
    seed: int = 0,
) -> Dataset:
    r"""Resample a dataset with von Mises weights along a CV, recording the weights that undo it.

    Parameters
    ----------
    dataset : Dataset
        Unweighted (Boltzmann) frames, or frames with log-weights; the
        resampling probability is :math:`\propto w_n \omega(\phi_n)`.
    cv : CollectiveVariable
        E.g. ``system.cvs["phi"]``.
    n_samples : int or None
        Frames to draw (with replacement); default ``len(dataset)``.
    mu, kappa, scale, offset : float
        See :func:`von_mises_weight`.
    seed : int
        NumPy generator seed.

    Returns
    -------
    Dataset
        The resampled frames; ``log_weights = -ln omega(cv)`` (weights with
        respect to the original ensemble); ``metadata["biasing"]`` holds the
        parameters and ``source_indices``.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot bias an empty dataset")
    n_samples = n if n_samples is None else int(n_samples)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    phi = np.asarray(cv(dataset.positions.astype(np.float64)), dtype=np.float64)
    omega = von_mises_weight(phi, mu, kappa, scale, offset)
    p = dataset.weights() * omega
    p /= p.sum()
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=n_samples, replace=True, p=p)
    ess = 1.0 / np.sum(p**2)
    logger.info("von Mises biasing: %d draws from %d frames (ESS of the draw distribution %.0f)", n_samples, n, ess)
    meta = dict(dataset.metadata)
    meta["biasing"] = {
        "kind": "von_mises_resampling",
        "cv": cv.name,
        "mu": mu,
        "kappa": kappa,
        "scale": scale,
        "offset": offset,
        "seed": seed,
        "source_indices": idx,
        "source_log_weights_definition": dataset.log_weights_definition,
    }
    return Dataset(
        dataset.positions[idx],
        dataset.topology,
        -np.log(omega[idx]),
        (
            f"-ln omega({cv.name}), omega = {scale} * vonMises({cv.name} | mu={mu}, kappa={kappa}) + {offset}: "
            "undoes the training-set bias; self-normalised weights recover the "
            + ("source's weighted ensemble" if dataset.log_weights is not None else "source ensemble")
        ),
        meta,
        None if dataset.time is None else dataset.time[idx],
        dataset.units,
    )
