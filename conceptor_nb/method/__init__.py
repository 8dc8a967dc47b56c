"""The method, one module per stage in the order it runs: inject (the pseudo-token), generate (concept images), vocab
(CLIP's vocabulary embedding), dictionary, fit, transfer (export, compare), decomposition (the result), decompose."""
