"""The library behind the pipeline's stages: data, networks (`models`), training methods
(`methods`), the shared training loop, evaluation and I/O."""
