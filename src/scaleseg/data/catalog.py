"""The :class:`DatasetSpec` (classes, palette, ignore id) a config names, without reading any data.

Deployment (export sidecars, model cards, ``scaleseg serve``) needs the class names and colours of a
trained model on a machine that has no copy of its dataset.
"""
from __future__ import annotations

from ..config import DataConfig
from ..errors import ConfigError
from .spec import IGNORE_INDEX, DatasetSpec

__all__ = ["spec_for"]


def spec_for(data: DataConfig) -> DatasetSpec:
    """Spec of ``data.dataset`` (``folder``: from ``data.classes``/``palette``/``ignore_index``)."""
    name = data.dataset
    if name == "scalescenes":
        from .scalescenes import SCALESCENES

        return SCALESCENES
    if name == "cityscapes":
        from .cityscapes import CITYSCAPES

        return CITYSCAPES
    if name == "camvid":
        from .camvid import CAMVID

        return CAMVID
    if name == "ade20k":
        from .ade20k import ADE20K

        return ADE20K
    if name == "mapillary":
        from .mapillary import SPECS

        version = data.version or "v1.2"
        if version not in SPECS:
            raise ConfigError(f"config key 'data.version' = {version!r}: expected one of {sorted(SPECS)}")
        return SPECS[version]
    if name == "folder":
        from .folder import make_spec

        if not data.classes:
            raise ConfigError("config key 'data.classes' must list the class names of a 'folder' dataset")
        ignore = IGNORE_INDEX if data.ignore_index is None else data.ignore_index
        return make_spec(data.classes, data.palette, ignore)
    raise ConfigError(f"config key 'data.dataset' = {name!r} has no known classes")
