"""The applications of a decomposition: explain one image, detect and mitigate bias, edit coefficients."""
from __future__ import annotations

from ..io import load_result, save_result


class Saved:
    """``save``/``load`` for a result dataclass: ``<kind>.json`` and its tensors in ``<kind>.safetensors``."""

    kind = ""

    def save(self, folder, overwrite: bool = False):
        return save_result(self, folder, self.kind, overwrite)

    @classmethod
    def load(cls, folder):
        return load_result(cls, folder, cls.kind)
