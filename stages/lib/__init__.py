"""Shared code of the pipeline's stages: config, data, nets, train, evaluation, io, paths."""
