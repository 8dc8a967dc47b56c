"""The toy world: a small drawn world with known concepts, a toy diffusion model and CLIP trained on it
(``python -m conceptor_nb.toyworld.train``), a pixel oracle, and the evaluation of Conceptor against the
known answers (``python -m conceptor_nb.toyworld.evaluate``)."""
from .examples import Examples, colour_oracle, colour_share, examples, identity_share, shipped_lora, toy_spec
from .metrics import explanation_frame, mixture_proportions, score_decomposition, score_frame
from .oracle import Oracle
from .render import render_word
from .report import report_headline, report_markdown, shipped_report
from .spec import Spec, load_spec

__all__ = ["Examples", "Oracle", "Spec", "colour_oracle", "colour_share", "examples", "explanation_frame",
           "identity_share", "load_spec", "mixture_proportions", "render_word", "report_headline", "report_markdown",
           "score_decomposition", "score_frame", "shipped_lora", "shipped_report", "toy_spec"]
