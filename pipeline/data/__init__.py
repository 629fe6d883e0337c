"""Datasets into FFCV stores, and the loaders that read them back.

    from pipeline.data.prepare_config import PrepareConfig   # torch-free: the CLI uses it
    from pipeline.data.prepare import prepare                # reader -> writer -> publish
    from pipeline.data.store import open_store               # manifest + sha256 check
    from pipeline.data.loaders import make_loader            # FFCV Loader for training

Only `loaders` and `writer` import ffcv/torch, and only when called; importing this package
is cheap.
"""
