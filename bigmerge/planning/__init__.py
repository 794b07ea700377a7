"""What to merge, before any tensor byte is read: the config, the sources' catalogs (headers only), the tokenizer plan, the block plan and its estimate."""
