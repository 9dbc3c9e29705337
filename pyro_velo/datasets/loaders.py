"""Real data sets, loaded through scVelo: :func:`pancreas` and :func:`dentate_gyrus`.

Each is downloaded once, then read from scVelo's cache. Without a network connection they
raise :class:`DatasetUnavailableError` within seconds (a reachability check with a
timeout runs before any download), saying how to download the file by hand.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import anndata

__all__ = ["NETWORK_TIMEOUT", "DatasetUnavailableError", "dentate_gyrus", "pancreas"]

#: Seconds the network check may take before a data set is declared unavailable.
NETWORK_TIMEOUT = 3.0
_SCVELO_DATA_URL = "https://github.com/theislab/scvelo_notebooks/raw/master/"
# name -> (scvelo.datasets function, scVelo's default file, path under the data URL)
_REAL_DATASETS = {
    "pancreas": ("pancreas", "data/Pancreas/endocrinogenesis_day15.h5ad",
                 "data/Pancreas/endocrinogenesis_day15.h5ad"),
    "dentate_gyrus": ("dentategyrus", "data/DentateGyrus/10X43_1.h5ad",
                      "data/DentateGyrus/10X43_1.h5ad"),
}


class DatasetUnavailableError(OSError):
    """A real data set is neither cached locally nor downloadable (e.g. offline).

    Subclass of :class:`OSError`; the message names the data set, the URL and the file
    to place a manual download at.
    """


def _reachable(host: str, port: int = 443, timeout: float = NETWORK_TIMEOUT) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds.

    Name resolution and connection run in a daemon thread, so a hanging DNS lookup
    cannot block longer than ``timeout`` either.
    """
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _load_real(name: str, file_path: str | Path | None) -> anndata.AnnData:
    function, default_path, remote = _REAL_DATASETS[name]
    path = Path(default_path if file_path is None else file_path)
    url = _SCVELO_DATA_URL + remote
    manual = (f"To use it offline, download {url} on a machine with internet access and "
              f"save it as {path.resolve()} (or pass file_path=... to "
              f"pyro_velo.datasets.{name}()).")
    import scvelo.datasets

    loader = getattr(scvelo.datasets, function)
    if not path.is_file():
        host = urlsplit(url).hostname
        if not _reachable(host):
            raise DatasetUnavailableError(
                f"The {name} data set is not cached at {path.resolve()} and cannot be "
                f"downloaded: {host} is unreachable (this machine seems to be offline). "
                + manual)
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        adata = loader(str(path))
    except Exception as err:  # a failed or interrupted download, an unreadable file
        raise DatasetUnavailableError(
            f"The {name} data set could not be loaded ({type(err).__name__}: {err}). "
            + manual) from err
    return adata


def pancreas(file_path: str | Path | None = None) -> anndata.AnnData:
    """Pancreatic endocrinogenesis at E15.5 (Bastidas-Ponce et al. 2019), via scVelo.

    3696 cells x 27998 genes with raw ``spliced`` / ``unspliced`` counts, cell types in
    ``obs['clusters']`` and a UMAP in ``obsm['X_umap']``. Calls
    :func:`scvelo.datasets.pancreas`, which downloads the file (about 50 MB) once and
    then reads it from the cache.

    Parameters
    ----------
    file_path
        Where the file is cached; default scVelo's default location,
        ``data/Pancreas/endocrinogenesis_day15.h5ad`` relative to the working directory.

    Raises
    ------
    DatasetUnavailableError
        If the file is not cached and the download fails; without a network connection
        this happens after at most a few seconds (:data:`NETWORK_TIMEOUT`). The message
        says where to download the file by hand and where to put it.

    Examples
    --------
    >>> import pyro_velo as pv
    >>> adata = pv.datasets.pancreas()
    >>> pv.pp.preprocess(adata)
    """
    return _load_real("pancreas", file_path)


def dentate_gyrus(file_path: str | Path | None = None) -> anndata.AnnData:
    """Dentate gyrus neurogenesis (Hochgerner et al. 2018), via scVelo.

    2930 cells x 13913 genes (scVelo's adjusted version) with raw ``spliced`` /
    ``unspliced`` counts, cell types in ``obs['clusters']`` and a 2-D embedding in
    ``obsm['X_umap']``. Calls :func:`scvelo.datasets.dentategyrus`, which downloads the
    file once and then reads it from the cache.

    Parameters
    ----------
    file_path
        Where the file is cached; default scVelo's default location,
        ``data/DentateGyrus/10X43_1.h5ad`` relative to the working directory.

    Raises
    ------
    DatasetUnavailableError
        As for :func:`pancreas`.
    """
    return _load_real("dentate_gyrus", file_path)
