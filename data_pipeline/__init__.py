"""Dataset building on Ray + img2dataset (python data_pipeline/build.py <recipe>) and the shard reader
training uses (vqd.shards). Stages, one module each: metadata, filters, download, encode,
manifest (final shards + validation); recipe.py holds the typed recipe, common.py what stages share."""
