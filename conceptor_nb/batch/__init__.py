"""Many concepts: the list and its claims (``jobs``), the run and its summary (``runner``), the gallery (``report``)."""
from .jobs import (CLAIMS, Claim, Job, as_jobs, claim_state, done_hash,  # noqa: F401
                   read_concepts, settings_hash)
from .report import build_report  # noqa: F401
from .runner import (LOG, SUMMARY_FIELDS, TOP_K, collect, decompose_many, load_decompositions, load_runs,  # noqa: F401
                     log_event, read_log, run_one, summary_row, summary_rows, token_matrix, unet_evaluations,
                     write_summary)
