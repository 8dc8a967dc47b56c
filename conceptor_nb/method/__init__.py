"""The method, one module per stage in the order it runs: inject (the pseudo-token), generate (the concept's
images), vocab (CLIP's embedding of the vocabulary), dictionary, fit, decomposition (the result), decompose."""
