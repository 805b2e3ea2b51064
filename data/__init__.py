"""Token data: the offline GPT-2 tokenizer, the token-file format and the batch loader."""
