"""pyro_velo: variational mixtures of ODEs (VeloVAE) for RNA velocity, in Pyro."""

__version__ = "0.1.0"
