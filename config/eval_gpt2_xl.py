# GPT-2 xl's own val loss on OpenWebText, nanoGPT's config/eval_gpt2_xl.py: evaluate, never train.
# Fetch the model once wherever a network is (nothing here downloads), and prepare the data:
#   hf download openai-community/gpt2-xl --local-dir hf/gpt2-xl
#   python -m data.openwebtext.prepare
#   python train.py config/eval_gpt2_xl.py                 # or torchrun --standalone --nproc_per_node=8 ...
# nanoGPT reports val loss 3.12, 2.84, 2.67 and 2.54 for gpt2, -medium, -large and -xl on its split.

out_dir = "out-eval-gpt2-xl"  # gets one eval_only record in log.jsonl, nothing else
init_from = "hf/gpt2-xl"
dataset = "openwebtext"
block_size = 1024
micro_batch_size = 8
eval_steps = 500  # 500 batches of 8 x 1024 tokens: 4.1M tokens per split, nanoGPT's eval_iters
eval_only = True
