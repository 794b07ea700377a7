"""Where merged blocks go: the output file layout, the two writers (direct into the output files, or a zarr store) and export into a Hugging Face checkpoint."""
