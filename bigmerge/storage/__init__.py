"""Where bytes come from and go to: fsspec URLs, safetensors headers, the zarr store, export."""
