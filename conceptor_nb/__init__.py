"""conceptor_nb: explain how a text-to-image diffusion model represents a concept (Conceptor, ICLR 2024).

One call per stage::

    s = setup()                                  # the active profile's model, CLIP and settings
    dec = decompose(s.pipe, "a dog")             # images -> dictionary -> fit
    dec.to_frame(); dec.plot(); dec.render(s.pipe, seeds=range(4))
    explain_image(s.pipe, dec, seed=0); detect_bias(...); mitigate_bias(...); sweep(...)
    decompose_many(s.pipe, ["a dog", "a cat"], out="runs")   # many concepts, resumable
"""
from .apps.bias import BiasReport, Mitigation, detect_bias, mitigate_bias
from .apps.explain import ImageExplanation, explain_image
from .apps.manipulate import Panel, Sweep, panel, set_coefficient, sweep
from .batch import (build_report, decompose_many, load_decompositions, load_runs, read_log, settings_hash,
                    token_matrix)
from .clip import load_clip
from .config import Profile, Settings, cache_dir, figures_dir, profile, settings
from .errors import (CacheError, ConceptorError, FitDivergedError, InvalidInputError, ModelNotFoundError,
                     OutputError)
from .method.decompose import decompose
from .method.decomposition import Decomposition, decomposition_table
from .method.dictionary import Dictionary, build_dictionary
from .method.generate import SCHEDULERS, concept_images, generate
from .method.inject import pseudo_token
from .method.transfer import Comparison, compare, load_embedding
from .models import Setup, load_pipeline, setup
from .io import save_figure
from .viz import coefficient_bars, image_grid, show_images, word_picture

__version__ = "0.1.0"
__all__ = [name for name in dir() if not name.startswith("_") and name not in ("apps", "batch", "clip", "config",
                                                                                "errors", "method", "models", "viz",
                                                                                "io", "checks", "loading")]
