"""pyro_velo: variational mixtures of ODEs (VeloVAE) for RNA velocity, in Pyro.

Namespaces follow scanpy: :mod:`pyro_velo.pp` (preprocessing), :mod:`pyro_velo.pl`
(plots), :mod:`pyro_velo.datasets` (simulator), the model class :class:`VeloVAE`, and
``settings`` (e.g. ``pyro_velo.settings.verbosity``).
"""

__version__ = "0.1.0"

from . import datasets, kinetics, pl, pp, tl, velocity_genes  # noqa: E402
from ._settings import settings  # noqa: E402
from .velovae import VeloVAE  # noqa: E402

__all__ = ["VeloVAE", "datasets", "kinetics", "pl", "pp", "settings", "tl", "velocity_genes",
           "__version__"]
