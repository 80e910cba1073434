"""Checkpoint formats: NeMo (.nemo tar or directory; torch_dist or zarr weights) and Hugging Face safetensors.

`load_model(path, ps)` is the entry point; the names below are imported lazily so that importing a submodule
(e.g. `nemotron.checkpoint.shards`) stays cheap and free of import cycles.
"""
_EXPORTS = {
    "LoadedModel": "nemotron.checkpoint.loader",
    "load_model": "nemotron.checkpoint.loader",
    "load_full_state": "nemotron.checkpoint.loader",
    "detect_format": "nemotron.checkpoint.loader",
    "CheckpointError": "nemotron.checkpoint.shards",
    "ShardSpec": "nemotron.checkpoint.shards",
    "shard_specs": "nemotron.checkpoint.shards",
    "open_nemo": "nemotron.checkpoint.nemo",
    "write_nemo_dir": "nemotron.checkpoint.nemo",
    "save_hf_dir": "nemotron.checkpoint.hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nemotron.checkpoint' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
