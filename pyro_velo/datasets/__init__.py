"""Data sets: simulated single-cell RNA velocity data with known ground truth, and real data.

- :mod:`~pyro_velo.datasets.ode`: :func:`simulate`, counts from the transcription,
  splicing and degradation ODE on a linear or bifurcating trajectory, with every
  ground-truth quantity stored; :func:`expected_state`, the noise-free trajectory at any
  time and branch.
- :mod:`~pyro_velo.datasets.h5ad`: :func:`simulate_h5ad`, the same process written chunk
  by chunk to an ``.h5ad`` file (atlas scale, flat memory).
- :mod:`~pyro_velo.datasets.scvelo_simulator`: :func:`simulate_scvelo`, scVelo's simulator
  with the true velocities, a check independent of our own simulator.
- :mod:`~pyro_velo.datasets.grn`: :func:`simulate_grn`, counts from a stochastic gene
  regulatory network (Hill regulation, chemical Langevin kinetics, cell types as
  steady states of programmes): data outside the model's ODE family.
- :mod:`~pyro_velo.datasets.loaders`: :func:`pancreas` and :func:`dentate_gyrus` through
  scVelo; offline they raise :class:`DatasetUnavailableError` within seconds.
"""

from .grn import simulate_grn
from .h5ad import simulate_h5ad
from .loaders import NETWORK_TIMEOUT, DatasetUnavailableError, dentate_gyrus, pancreas
from .ode import BEHAVIOURS, DEFAULT_BEHAVIOURS, expected_state, simulate
from .scvelo_simulator import simulate_scvelo

__all__ = [
    "simulate",
    "simulate_h5ad",
    "simulate_scvelo",
    "simulate_grn",
    "expected_state",
    "pancreas",
    "dentate_gyrus",
    "DatasetUnavailableError",
    "BEHAVIOURS",
    "DEFAULT_BEHAVIOURS",
    "NETWORK_TIMEOUT",
]
