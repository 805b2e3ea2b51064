# The default run, spelled out: a 7.2M-parameter GPT (4 layers, 128 wide; most of it is the
# 50257 x 128 embedding) on Shakespeare's plays, about 5 minutes on 2 CPU cores.
# prepare first: python -m data.shakespeare.prepare

out_dir = "out/shakespeare"
dataset = "shakespeare"
model = "gpt2-mini"
block_size = 128
micro_batch_size = 16
tokens_per_step = 2048  # 16 batch * 128 block * 1 accum * 1 process
