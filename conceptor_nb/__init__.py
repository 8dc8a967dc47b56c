"""conceptor_nb: explain how a text-to-image diffusion model represents a concept (Conceptor, ICLR 2024).

One function per stage::

    pipe = load_pipeline("toy")                  # or a Stable Diffusion folder / hub id
    dec = decompose(pipe, "a dog")               # images -> dictionary -> fit
    dec.to_frame(); dec.plot(); dec.render(pipe, seeds=range(4))
"""
from .bias import BiasReport, Mitigation, detect_bias, mitigate_bias
from .config import Settings, settings
from .conceptor import Decomposition, decompose, decomposition_table
from .dictionary import Dictionary, build_dictionary
from .explain import ImageExplanation, explain_image
from .errors import CacheError, ConceptorError, FitDivergedError, InvalidInputError, ModelNotFoundError, OutputError
from .images import concept_images, generate
from .inject import pseudo_token
from .manipulate import Panel, Sweep, panel, set_coefficient, sweep
from .models import load_clip, load_pipeline

__version__ = "0.1.0"

__all__ = [
    "BiasReport", "ImageExplanation", "Mitigation", "Panel", "Sweep", "detect_bias", "explain_image",
    "mitigate_bias", "panel", "set_coefficient", "sweep",
    "CacheError", "ConceptorError", "FitDivergedError", "InvalidInputError", "OutputError", "Decomposition", "Dictionary", "ModelNotFoundError", "Settings",
    "build_dictionary", "concept_images", "decompose", "decomposition_table", "generate", "load_clip", "load_pipeline",
    "pseudo_token", "settings",
]
