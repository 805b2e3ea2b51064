# GPT-2 124M on OpenWebText, nanoGPT's recipe (which reaches val loss ~2.85 after 600k steps).
# prepare first: python -m data.openwebtext.prepare (or python -m data.fineweb.prepare with --dataset=fineweb)
# one GPU:    python train.py config/train_gpt2.py
# 8 GPUs:     torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

out_dir = "out-gpt2"
dataset = "openwebtext"  # or "fineweb": FineWeb-Edu, python -m data.fineweb.prepare
model = "gpt2"
block_size = 1024

# 12 batch * 1024 block * 40 accum * 1 GPU = 491,520 tokens per step (nanoGPT's);
# on 8 GPUs the same tokens_per_step gives 5 accumulation micro-steps per GPU.
micro_batch_size = 12
tokens_per_step = 491_520

lr = 6e-4  # nanoGPT / GPT-3 small
min_lr = 6e-5  # lr / 10
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_steps = 2000
max_steps = 600_000
lr_decay_steps = 600_000

eval_interval = 1000
eval_steps = 200
log_interval = 10

# The full-logits loss, which torch.compile fuses on a GPU. The chunked loss (loss_chunk_rows = 1024)
# saves the 12 x 1024 x 50,257 logits (2.5 GB in fp32) per micro-step; its GPU speed is unmeasured.
loss_chunk_rows = 0
