# Fine-tune GPT-2 (any size) on Shakespeare's plays, nanoGPT's recipe: a small constant rate, a few
# hundred steps, evaluation often. Starts from a local Hugging Face GPT-2 directory; nothing is ever
# downloaded at run time, so fetch one first wherever a network is:
#   hf download openai-community/gpt2 --local-dir hf/gpt2   # or gpt2-medium, -large, -xl (huggingface_hub's CLI;
#                                                           # older versions call it `huggingface-cli download`)
#   python -m data.shakespeare.prepare
#   python train.py config/finetune_shakespeare.py --init_from=hf/gpt2
#   python sample.py --out_dir=out-finetune-shakespeare --prompt="ROMEO:"
#   python export.py --out_dir=out-finetune-shakespeare --hf_dir=hf/gpt2-shakespeare   # a GPT-2 directory again
# The model's shape and positions come from the directory. lr_rule=lwlr measures the multipliers at the
# loaded weights (lwlr_init=model) over lwlr_T=10 batches; --lwlr_init=fan_out measures a re-initialized
# network, as the paper does from scratch (README, "Fine-tuning"). A restart with the same out_dir
# resumes from its checkpoints.

out_dir = "out-finetune-shakespeare"
init_from = "hf/gpt2"
dataset = "shakespeare"
block_size = 1024
micro_batch_size = 8  # fits gpt2-xl on one 80 GB GPU under bf16 autocast with fp32 states (lower it for CPU)
# 8 batch * 1024 block * 1 accum * 1 process; 200 steps = 1.6M tokens, 1.2 passes over the 1.4M-token train split
tokens_per_step = 8192
max_steps = 200
schedule = "constant"
warmup_steps = 10
lr = 3e-5  # nanoGPT's fine-tuning rate
min_lr = 3e-5
weight_decay = 0.1
eval_interval = 20
eval_steps = 20
log_interval = 5
