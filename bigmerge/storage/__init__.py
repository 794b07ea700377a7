"""The bottom layer: fsspec URLs and byte ranges, safetensors headers, CRC-32C checksums."""
