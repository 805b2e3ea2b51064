# Character-level Shakespeare: nanoGPT's fast path, on the embedded plays.
# prepare first: python -m data.shakespeare_char.prepare  (about 80 characters; train.py reads vocab.json)
# then:          python train.py config/train_shakespeare_char.py
#                python sample.py --out_dir=out-shakespeare-char --prompt="ROMEO:"

out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
model = "gpt2-mini"  # 4 layers x 128: 0.84M parameters with an 82-character vocabulary, 5% of them embeddings
block_size = 128

# 16 batch * 128 block * 1 accum * 1 process = 2,048 characters per step
micro_batch_size = 16
tokens_per_step = 2048

lr = 2e-3  # the default run's; a small model with a tiny vocabulary takes a large rate
min_lr = 2e-4
warmup_steps = 100
max_steps = 2000
eval_interval = 250
log_interval = 50
