"""The corpus stage: text beside the weights. Reading corpora into token windows (``sources``, ``vocab``, ``tokens``),
the model's own forward pass with hooks placed from the registry, and the streaming per-neuron statistics with their
merge (``mmdetect activations``; ``explain`` and ``scan --verify`` take their evidence from the same pass)."""
